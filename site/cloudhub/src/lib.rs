//! The cloud link: many sites attached to one hub.
//!
//! A site dials out to the hub (`edgesite server --cloudhub URL --cloudhub-token TOKEN`) and keeps
//! one TLS connection up ([`link`]); the hub calls the site over it. Nothing listens at the site
//! for the hub, so sites behind NAT or an egress-only proxy attach the same way.
//!
//! - [`hub`]: `edgesite cloudhub`'s side: a Karmada `Cluster` per site with its status and
//!   readiness, and the cluster proxy (`kubectl` to any site through the hub).
//! - [`site`]: the site's side: what it serves over its link (its status stream, its API for
//!   the proxy, acting as the hub's caller through impersonation).
//! - [`protocol`]: the paths, headers and messages both sides speak.
//! - [`crds`]: Karmada's resources as the hub serves them.

pub mod changes;
pub mod crds;
pub mod hub;
pub mod protocol;
pub mod resources;
pub mod site;
