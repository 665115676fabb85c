//! Names the claim machinery agrees on across crates. Pure.

/// The claim a pod's generic ephemeral volume gets: `<pod>-<volume>` (upstream's rule; the
/// ephemeral-volume controller makes it, the scheduler and the agent look it up, the Node
/// authorizer counts it as the pod's).
pub fn ephemeral_claim(pod: &str, volume: &str) -> String {
    format!("{pod}-{volume}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_claim_is_named_after_the_pod_and_the_volume() {
        assert_eq!(super::ephemeral_claim("web-0", "scratch"), "web-0-scratch");
    }
}
