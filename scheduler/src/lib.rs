//! EdgeSite's pod scheduler, shaped like upstream's kube-scheduler: a [`queue`] with backoff and
//! an unschedulable set that cluster changes flush, filter and score [`plugins`] (pure
//! functions over [`framework`] types), one [`algorithm`] cycle per pod, and the
//! [`scheduler`] loop that keeps the cache, binds through `pods/binding` and records
//! `Scheduled` / `FailedScheduling` events.
//!
//! Not yet: preemption (a higher-priority pod waits instead of evicting lower ones) and volume
//! topology (pods with PersistentVolumeClaims are placed without looking at volumes).

pub mod algorithm;
pub mod framework;
pub mod plugins;
pub mod queue;
pub mod scheduler;

pub use scheduler::{Config, Scheduler};
