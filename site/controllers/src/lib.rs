//! EdgeSite's control loops. Each is a kube-runtime controller against the API server (through
//! the in-process client inside `edgesite server`), so they run the same code path as any remote
//! client and prove the API's compatibility as they go.
//!
//! Start with [`namespace`]: deleting a namespace deletes what it contains, then the namespace.

pub mod namespace;
