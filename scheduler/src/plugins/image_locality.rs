//! ImageLocality: nodes that already hold the pod's images score higher, scaled by image size
//! and by how many nodes have them (upstream's thresholds: 23 MiB to 1000 MiB per container).

use super::{MAX_SCORE, ScorePlugin};
use crate::framework::{CycleState, NodeInfo, PodInfo, Snapshot, normalize_image};

const MIN_THRESHOLD: i64 = 23 * 1024 * 1024;
const MAX_CONTAINER_THRESHOLD: i64 = 1000 * 1024 * 1024;

pub struct ImageLocality;

/// Per-pod state: for each image of the pod, on how many nodes it is.
pub struct ImageSpread {
    pub images: Vec<(String, usize)>,
    pub total_nodes: usize,
}

impl ScorePlugin for ImageLocality {
    fn name(&self) -> &'static str {
        "ImageLocality"
    }

    fn weight(&self) -> i64 {
        1
    }

    fn pre_score(
        &self,
        pod: &PodInfo,
        _: &[&NodeInfo],
        snapshot: &Snapshot,
        state: &mut CycleState,
    ) {
        let Some(spec) = pod.pod.spec.as_ref() else {
            return;
        };
        let images: Vec<String> = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .filter_map(|c| c.image.as_deref())
            .map(normalize_image)
            .collect();
        let spread = images
            .into_iter()
            .map(|i| {
                let n = snapshot
                    .nodes
                    .iter()
                    .filter(|n| n.images.contains_key(&i))
                    .count();
                (i, n)
            })
            .collect();
        state.images = Some(ImageSpread {
            images: spread,
            total_nodes: snapshot.nodes.len().max(1),
        });
    }

    fn score(&self, _: &PodInfo, node: &NodeInfo, state: &CycleState) -> i64 {
        let Some(spread) = state.images.as_ref() else {
            return 0;
        };
        let sum: i64 = spread
            .images
            .iter()
            .filter_map(|(image, count)| {
                let size = *node.images.get(image)?;
                Some(size * *count as i64 / spread.total_nodes as i64)
            })
            .sum();
        let containers = spread.images.len().max(1) as i64;
        let max = MAX_CONTAINER_THRESHOLD * containers;
        let sum = sum.clamp(MIN_THRESHOLD, max);
        MAX_SCORE * (sum - MIN_THRESHOLD) / (max - MIN_THRESHOLD)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::framework::testing::*;

    #[test]
    fn nodes_holding_big_images_score_higher() {
        let mut with = node("n1", "1", "1Gi", "10");
        with.status.as_mut().unwrap().images = Some(vec![from_json(
            json!({"names": ["docker.io/library/busybox:latest"], "sizeBytes": 500 * 1024 * 1024}),
        )]);
        let snapshot = Snapshot {
            nodes: vec![
                NodeInfo::new(Arc::new(with)),
                NodeInfo::new(Arc::new(node("n2", "1", "1Gi", "10"))),
            ],
            ..Default::default()
        };
        let p = PodInfo::new(Arc::new(pod("a", "0", "0")));
        let mut state = CycleState::default();
        ImageLocality.pre_score(&p, &[], &snapshot, &mut state);
        let with_score = ImageLocality.score(&p, &snapshot.nodes[0], &state);
        let without = ImageLocality.score(&p, &snapshot.nodes[1], &state);
        assert!(with_score > without, "{with_score} > {without}");
        assert_eq!(without, 0);
    }
}
