//! Filter and score plugins, upstream's default set and order. Each is pure: it reads a
//! [`PodInfo`], a [`NodeInfo`] and the per-cycle state and returns a verdict or a score.
//!
//! Filters run in upstream's order and a node is rejected by the first filter that fails, so
//! the reasons counted in `FailedScheduling` messages match upstream's.

pub mod image_locality;
pub mod inter_pod_affinity;
pub mod node_affinity;
pub mod node_basics;
pub mod resources;
pub mod taint_toleration;
pub mod topology_spread;
pub mod volume_binding;

use crate::framework::{CycleState, NodeInfo, PodInfo, Snapshot};

/// Why a node cannot take a pod, in upstream's words ("Insufficient cpu").
pub type Reasons = Vec<String>;

/// A scheduling score is in `0..=MAX_SCORE` before weighting.
pub const MAX_SCORE: i64 = 100;

pub trait FilterPlugin: Send + Sync {
    fn name(&self) -> &'static str;

    /// Computes what [`FilterPlugin::filter`] needs once per pod. An error means no node can
    /// take the pod (its reason is reported for every node).
    fn pre_filter(
        &self,
        _pod: &PodInfo,
        _snapshot: &Snapshot,
        _state: &mut CycleState,
    ) -> Result<(), String> {
        Ok(())
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, state: &CycleState) -> Result<(), Reasons>;
}

pub trait ScorePlugin: Send + Sync {
    fn name(&self) -> &'static str;
    fn weight(&self) -> i64;

    /// Computes what [`ScorePlugin::score`] needs once per pod, given the feasible nodes.
    fn pre_score(
        &self,
        _pod: &PodInfo,
        _feasible: &[&NodeInfo],
        _snapshot: &Snapshot,
        _state: &mut CycleState,
    ) {
    }

    fn score(&self, pod: &PodInfo, node: &NodeInfo, state: &CycleState) -> i64;

    /// Rescales raw scores to `0..=MAX_SCORE` (the default keeps them).
    fn normalize(&self, _scores: &mut [i64]) {}
}

/// Upstream's default filters, in order.
pub fn default_filters() -> Vec<Box<dyn FilterPlugin>> {
    vec![
        Box::new(node_basics::NodeUnschedulable),
        Box::new(node_basics::NodeName),
        Box::new(taint_toleration::TaintToleration),
        Box::new(node_affinity::NodeAffinity),
        Box::new(node_basics::NodePorts),
        Box::new(resources::Fit),
        Box::new(volume_binding::VolumeBinding),
        Box::new(topology_spread::PodTopologySpread),
        Box::new(inter_pod_affinity::InterPodAffinity),
    ]
}

/// Upstream's default scores and weights.
pub fn default_scores() -> Vec<Box<dyn ScorePlugin>> {
    vec![
        Box::new(taint_toleration::TaintToleration),
        Box::new(node_affinity::NodeAffinity),
        Box::new(resources::LeastAllocated),
        Box::new(resources::BalancedAllocation),
        Box::new(image_locality::ImageLocality),
        Box::new(inter_pod_affinity::InterPodAffinity),
        Box::new(topology_spread::PodTopologySpread),
    ]
}

/// Min-max rescaling to `0..=MAX_SCORE`; `reverse` makes the lowest raw score the best.
pub fn normalize_min_max(scores: &mut [i64], reverse: bool) {
    let (Some(&min), Some(&max)) = (scores.iter().min(), scores.iter().max()) else {
        return;
    };
    for s in scores.iter_mut() {
        if max == min {
            // No node is preferred.
            *s = 0;
            continue;
        }
        let v = MAX_SCORE * (*s - min) / (max - min);
        *s = if reverse { MAX_SCORE - v } else { v };
    }
}

/// Rescales `0..=max` to `0..=MAX_SCORE`; `reverse` makes 0 the best.
pub fn normalize_by_max(scores: &mut [i64], reverse: bool) {
    let max = scores.iter().copied().max().unwrap_or(0);
    for s in scores.iter_mut() {
        let v = if max == 0 { 0 } else { MAX_SCORE * *s / max };
        *s = if reverse { MAX_SCORE - v } else { v };
    }
}
