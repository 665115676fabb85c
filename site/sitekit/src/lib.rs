//! The bottom of EdgeSite's crates: small pure pieces that the API server, the control loops,
//! the scheduler and the node agent all use, so none of them imports another for them.

pub mod claims;
pub mod quantity;
