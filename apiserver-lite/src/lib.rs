//! apiserver-lite: the Kubernetes API server of an EdgeSite site.
//!
//! It is the only owner of cluster state. Start reading at [`server`] (start-up), then [`http`]
//! (routes and the request life cycle), [`storage`] (the SQLite store and the watch hub) and
//! [`kinds`] (per-kind defaults, validation and status handling). Pure pieces with no I/O:
//! [`selectors`], [`validation`], [`tables`], [`patch`].

pub mod api_endpoints;
pub mod apiservices;
pub mod auth;
pub mod certificates;
pub mod cloud_link;
pub mod conversion;
pub mod crd;
pub mod error;
pub mod go_json;
pub mod http;
pub mod kinds;
pub mod metrics;
pub mod node_streams;
pub mod openapi;
pub mod openapi_v2;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod selectors;
pub mod server;
pub mod service_accounts;
pub mod services;
pub mod storage;
pub mod streams;
pub mod structural;
pub mod tables;
pub mod validation;

pub use server::{Advertise, Config, Datastore, ServerError, run};
