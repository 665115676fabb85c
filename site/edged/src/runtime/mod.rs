//! Container runtimes. EdgeSite runs containers through containerd only; `containerd.rs` is the
//! one place that speaks its API.

pub mod containerd;
