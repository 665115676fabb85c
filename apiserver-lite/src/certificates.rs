//! The certificates API (`certificates.k8s.io/v1` CertificateSigningRequest): how a site
//! operator gives a colleague a client certificate without sharing the admin kubeconfig
//! (`kubectl certificate approve`). Pure rules of the kind: the requester's identity is
//! recorded on create, the request must be a PEM CSR, approval changes only the Approved/Denied
//! conditions and the signer's status writes cannot change them. Who may approve or sign is
//! asked of the authorizer (`approve`/`sign` on `signers`). The signer itself (the cluster CA)
//! runs in the control plane (`edgesite`'s `csr_signer`).

use serde_json::{Value, json};

use crate::auth::Identity;
use crate::error::Cause;

pub const GROUP: &str = "certificates.k8s.io";
/// Client certificates for the API server, signed by the cluster CA once approved.
pub const KUBE_APISERVER_CLIENT: &str = "kubernetes.io/kube-apiserver-client";
/// The signer of kubelets' serving certificates (the control plane approves a node's own).
pub const KUBELET_SERVING: &str = "kubernetes.io/kubelet-serving";

const USAGES: &[&str] = &[
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
];

/// On create: who asked is whoever made the request, whatever the body says; no status yet.
pub fn prepare_create(object: &mut Value, user: &Identity) {
    let spec = &mut object["spec"];
    if !spec.is_object() {
        *spec = json!({});
    }
    spec["username"] = json!(user.user);
    spec["groups"] = json!(user.groups);
    if user.uid.is_empty() {
        if let Some(s) = spec.as_object_mut() {
            s.remove("uid");
        }
    } else {
        spec["uid"] = json!(user.uid);
    }
    if user.extra.is_empty() {
        if let Some(s) = spec.as_object_mut() {
            s.remove("extra");
        }
    } else {
        spec["extra"] = json!(user.extra);
    }
    if let Some(o) = object.as_object_mut() {
        o.remove("status");
    }
}

/// The DER of the request's CSR, if `spec.request` (base64 of PEM) holds one.
pub fn request_der(object: &Value) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let encoded = object
        .pointer("/spec/request")
        .and_then(Value::as_str)
        .unwrap_or("");
    let pem = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "not valid base64".to_string())?;
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|_| "PEM block type must be CERTIFICATE REQUEST".to_string())?;
    if block.label != "CERTIFICATE REQUEST" && block.label != "NEW CERTIFICATE REQUEST" {
        return Err("PEM block type must be CERTIFICATE REQUEST".into());
    }
    use x509_parser::prelude::FromDer;
    x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents)
        .map_err(|e| format!("the certificate request does not parse: {e}"))?;
    Ok(block.contents)
}

/// Upstream's CertificateSubjectRestriction: nobody gets a `system:masters` client certificate
/// through this API, whoever approves it.
pub fn subject_restriction(object: &Value) -> Result<(), String> {
    let signer = object
        .pointer("/spec/signerName")
        .and_then(Value::as_str)
        .unwrap_or("");
    if signer != KUBE_APISERVER_CLIENT {
        return Ok(());
    }
    let Ok(der) = request_der(object) else {
        return Ok(()); // validation names what is wrong with the request
    };
    use x509_parser::prelude::FromDer;
    let Ok((_, csr)) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
    else {
        return Ok(());
    };
    let masters = csr
        .certification_request_info
        .subject
        .iter_organization()
        .any(|o| o.as_str().ok() == Some(crate::auth::MASTERS));
    if masters {
        Err(format!(
            "use of {KUBE_APISERVER_CLIENT} signer with {} group is not allowed",
            crate::auth::MASTERS
        ))
    } else {
        Ok(())
    }
}

pub fn validate(object: &Value, causes: &mut Vec<Cause>) {
    match object.pointer("/spec/request").and_then(Value::as_str) {
        None | Some("") => causes.push(Cause::required("spec.request")),
        Some(_) => {
            if let Err(e) = request_der(object) {
                causes.push(Cause::new(
                    "FieldValueInvalid",
                    "spec.request",
                    format!("Invalid value: []byte{{...}}: {e}"),
                ));
            }
        }
    }
    let signer = object
        .pointer("/spec/signerName")
        .and_then(Value::as_str)
        .unwrap_or("");
    if signer.is_empty() {
        causes.push(Cause::required("spec.signerName"));
    } else if !signer.contains('/') {
        causes.push(Cause::invalid(
            "spec.signerName",
            &json!(signer),
            "must be a fully qualified domain and path of the form 'example.com/signer-name'",
        ));
    }
    let usages: Vec<&str> = object
        .pointer("/spec/usages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if usages.is_empty() {
        causes.push(Cause::required("spec.usages"));
    }
    for (i, u) in usages.iter().enumerate() {
        if !USAGES.contains(u) {
            causes.push(Cause::unsupported(
                format!("spec.usages[{i}]"),
                &json!(u),
                USAGES,
            ));
        }
    }
    if signer == KUBE_APISERVER_CLIENT {
        for (i, u) in usages.iter().enumerate() {
            if !["digital signature", "key encipherment", "client auth"].contains(u) {
                causes.push(Cause::unsupported(
                    format!("spec.usages[{i}]"),
                    &json!(u),
                    &["client auth", "digital signature", "key encipherment"],
                ));
            }
        }
        if !usages.contains(&"client auth") {
            causes.push(Cause::invalid(
                "spec.usages",
                &json!(usages),
                "missing required value \"client auth\"",
            ));
        }
    }
    if signer == KUBELET_SERVING {
        for (i, u) in usages.iter().enumerate() {
            if !["digital signature", "key encipherment", "server auth"].contains(u) {
                causes.push(Cause::unsupported(
                    format!("spec.usages[{i}]"),
                    &json!(u),
                    &["digital signature", "key encipherment", "server auth"],
                ));
            }
        }
        if !usages.contains(&"server auth") {
            causes.push(Cause::invalid(
                "spec.usages",
                &json!(usages),
                "missing required value \"server auth\"",
            ));
        }
    }
    if let Some(seconds) = object
        .pointer("/spec/expirationSeconds")
        .and_then(Value::as_i64)
        && seconds < 600
    {
        causes.push(Cause::invalid(
            "spec.expirationSeconds",
            &json!(seconds),
            "may not specify a duration less than 600 seconds (10 minutes)",
        ));
    }
    let mut seen = Vec::new();
    for (i, c) in object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let kind = c.get("type").and_then(Value::as_str).unwrap_or("");
        if seen.contains(&kind) && ["Approved", "Denied", "Failed"].contains(&kind) {
            causes.push(Cause::duplicate(
                format!("status.conditions[{i}].type"),
                &json!(kind),
            ));
        }
        seen.push(kind);
    }
    if seen.contains(&"Approved") && seen.contains(&"Denied") {
        causes.push(Cause::invalid(
            "status.conditions",
            &json!("Approved, Denied"),
            "Approved and Denied conditions are mutually exclusive",
        ));
    }
}

fn conditions(object: &Value) -> Vec<Value> {
    object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn is_decision(c: &Value) -> bool {
    matches!(
        c.get("type").and_then(Value::as_str),
        Some("Approved" | "Denied")
    )
}

/// `/approval`: the stored object with the request's conditions; nothing else changes. Once
/// approved or denied, a request stays so.
pub fn approval(old: &Value, new: &Value) -> Result<Value, String> {
    let before: Vec<Value> = conditions(old).into_iter().filter(is_decision).collect();
    let after = conditions(new);
    for c in &before {
        let kind = c.get("type");
        if !after.iter().any(|a| a.get("type") == kind) {
            return Err(format!(
                "status.conditions: Forbidden: updates may not remove a condition of type {}",
                kind.and_then(Value::as_str).unwrap_or("")
            ));
        }
    }
    let mut merged = old.clone();
    let now = crate::http::resources::now();
    let stamped: Vec<Value> = after
        .into_iter()
        .map(|mut c| {
            for field in ["lastUpdateTime", "lastTransitionTime"] {
                if c.get(field).is_none_or(Value::is_null) {
                    c[field] = json!(now);
                }
            }
            if c.get("status").is_none() {
                c["status"] = json!("True");
            }
            c
        })
        .collect();
    merged["status"]["conditions"] = json!(stamped);
    Ok(merged)
}

/// `/status`: the signer's write, which keeps the Approved/Denied conditions as they are.
pub fn status_update(old: &Value, mut merged: Value) -> Value {
    let decisions: Vec<Value> = conditions(old).into_iter().filter(is_decision).collect();
    let mut rest: Vec<Value> = conditions(&merged)
        .into_iter()
        .filter(|c| !is_decision(c))
        .collect();
    let mut all = decisions;
    all.append(&mut rest);
    if !merged["status"].is_object() {
        merged["status"] = json!({});
    }
    merged["status"]["conditions"] = json!(all);
    merged
}

/// Whether the request was approved (and not denied or failed).
pub fn approved(object: &Value) -> bool {
    let c = conditions(object);
    let has = |t: &str| {
        c.iter()
            .any(|x| x.get("type").and_then(Value::as_str) == Some(t))
    };
    has("Approved") && !has("Denied") && !has("Failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> Value {
        // A CSR made by openssl for CN=dave, O=devs (P-256).
        let pem = "-----BEGIN CERTIFICATE REQUEST-----\nMIHZMIGAAgEAMB4xDTALBgNVBAMMBGRhdmUxDTALBgNVBAoMBGRldnMwWTATBgcq\nhkjOPQIBBggqhkjOPQMBBwNCAAR3LU2FkKxC686ndfpyLJ4hw1QhjYzx4WidAMFF\nl9HoQIUsYHbX2w4gZdOWwZFXjZW71CyA26H+dOfTDQLJnYRnoAAwCgYIKoZIzj0E\nAwIDSAAwRQIhANH0zzDQmbFRTz7DU8puzf7sxB6vOEbNd7eiYsExrrkCAiBA+UH8\nysHpyP8y+ANBpZSN2mdZt/sBnuP6lO8vqWcjIg==\n-----END CERTIFICATE REQUEST-----\n";
        use base64::Engine;
        json!({"spec": {"request": base64::engine::general_purpose::STANDARD.encode(pem),
            "signerName": KUBE_APISERVER_CLIENT, "usages": ["client auth"],
            "username": "mallory", "groups": ["system:masters"]},
            "status": {"certificate": "Zm9v"}})
    }

    #[test]
    fn the_requester_is_recorded_and_bad_requests_are_invalid() {
        let mut o = csr();
        prepare_create(&mut o, &Identity::new("admin", &["system:authenticated"]));
        assert_eq!(o["spec"]["username"], "admin");
        assert_eq!(o["spec"]["groups"], json!(["system:authenticated"]));
        assert!(o.get("status").is_none());
        let mut causes = Vec::new();
        validate(&o, &mut causes);
        assert!(
            causes.iter().all(|c| c.field != "spec.usages"),
            "{causes:?}"
        );
        o["spec"]["request"] = json!("bm90IGEgY3Ny");
        o["spec"]["usages"] = json!(["server auth"]);
        let mut causes = Vec::new();
        validate(&o, &mut causes);
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert!(fields.contains(&"spec.request"), "{causes:?}");
        assert!(fields.contains(&"spec.usages[0]"), "{causes:?}");
    }

    #[test]
    fn no_masters_certificates_through_the_api() {
        assert!(subject_restriction(&csr()).is_ok());
        // CN=eve, O=system:masters, made by openssl.
        let pem = "-----BEGIN CERTIFICATE REQUEST-----\nMIHiMIGJAgEAMCcxDDAKBgNVBAMMA2V2ZTEXMBUGA1UECgwOc3lzdGVtOm1hc3Rl\ncnMwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQ3rT9Pk13dO58mv05Okz46Oby3\n0oJ5zdJ2n9xW1E0X3ED7BHlDqv4e1I/dg0BrWzMydrxcK7OyxaTVGhdXH3YloAAw\nCgYIKoZIzj0EAwIDSAAwRQIhAMThvVLTkGrB71Vkmla6KtAf0/o0+2nSvFDFKWP6\nbDviAiA1cJTr70CQbOWDaRnNK2SVCfRNYCYUlArWu0N4ksTYag==\n-----END CERTIFICATE REQUEST-----\n";
        use base64::Engine;
        let o = json!({"spec": {"request": base64::engine::general_purpose::STANDARD.encode(pem),
            "signerName": KUBE_APISERVER_CLIENT, "usages": ["client auth"]}});
        assert_eq!(
            subject_restriction(&o).unwrap_err(),
            "use of kubernetes.io/kube-apiserver-client signer with system:masters group is not allowed"
        );
    }

    #[test]
    fn approval_touches_only_conditions_and_sticks() {
        let old = csr();
        let mut new = old.clone();
        new["spec"]["username"] = json!("changed");
        new["status"]["conditions"] = json!([{"type": "Approved", "reason": "KubectlApprove"}]);
        let merged = approval(&old, &new).unwrap();
        assert_eq!(merged["spec"]["username"], "mallory");
        assert!(approved(&merged));
        let mut undo = merged.clone();
        undo["status"]["conditions"] = json!([]);
        assert!(approval(&merged, &undo).is_err());
        // The signer's status write cannot drop the approval.
        let mut signed = merged.clone();
        signed["status"] = json!({"certificate": "Y2VydA=="});
        let kept = status_update(&merged, signed);
        assert!(approved(&kept));
        assert_eq!(kept["status"]["certificate"], "Y2VydA==");
    }
}
