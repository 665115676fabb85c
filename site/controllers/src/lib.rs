//! EdgeSite's control loops. Each is a kube-runtime loop against the API server (through the
//! in-process client inside `edgesite server`), so they run the same code path as any remote
//! client and prove the API's compatibility as they go.
//!
//! Start with [`informer`] (one watch and cache per kind, shared by the loops) and [`events`];
//! then the loops: [`namespace`] (deleting a namespace deletes what it contains),
//! [`replicaset`], [`deployment`], [`garbage_collector`], [`endpoints`],
//! [`node_lifecycle`], [`disruption`], [`job`], [`cronjob`], [`daemonset`], [`statefulset`],
//! [`serviceaccount`], [`clusterrole_aggregation`], ...

pub mod backoff;
pub mod clusterrole_aggregation;
pub mod crds;
pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod ephemeral_volume;
pub mod events;
pub mod expectations;
pub mod garbage_collector;
pub mod history;
pub mod informer;
pub mod ingress;
pub mod job;
pub mod leader;
pub mod namespace;
pub mod network_policy;
pub mod node_ipam;
pub mod node_lifecycle;
pub mod node_match;
pub mod ownership;
pub mod persistent_volume;
pub mod podautoscaler;
pub mod pods;
pub mod replicaset;
pub mod runner;
pub mod serviceaccount;
pub mod servicelb;
pub mod statefulset;
