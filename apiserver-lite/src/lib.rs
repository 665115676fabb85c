//! apiserver-lite: the Kubernetes API server of an EdgeSite site.
//!
//! It is the only owner of cluster state. Start reading at [`http`] (the routes and the request
//! life cycle), then [`storage`] (the SQLite store and the watch hub) and [`kinds`] (per-kind
//! defaults, validation and status handling). Pure pieces with no I/O: [`selectors`],
//! [`validation`], [`tables`], [`patch`].

pub mod error;
pub mod kinds;
pub mod registry;
pub mod selectors;
pub mod storage;
pub mod tables;
pub mod validation;
