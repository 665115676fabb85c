//! The Gateway API's CustomResourceDefinitions (GatewayClass, Gateway, HTTPRoute,
//! `gateway.networking.k8s.io/v1`), installed with every site (the YAML beside this file).

use serde_json::Value;

const GATEWAY_CLASSES: &str = include_str!("crds/gatewayclasses.yaml");
const GATEWAYS: &str = include_str!("crds/gateways.yaml");
const HTTP_ROUTES: &str = include_str!("crds/httproutes.yaml");

pub fn definitions() -> Vec<Value> {
    [GATEWAY_CLASSES, GATEWAYS, HTTP_ROUTES]
        .iter()
        .map(|y| serde_yaml::from_str(y).expect("the embedded CRDs are valid YAML"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn definitions_parse_with_their_anchors_expanded() {
        let d = super::definitions();
        assert_eq!(d.len(), 3);
        assert_eq!(
            d[2]["metadata"]["name"],
            "httproutes.gateway.networking.k8s.io"
        );
        let rules = &d[2]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["rules"]["items"]["properties"];
        assert_eq!(
            rules["backendRefs"]["items"]["properties"]["filters"]["items"]["properties"]["type"]["type"],
            "string"
        );
    }
}
