//! ServiceAccount tokens: the TokenRequest API (`POST serviceaccounts/<name>/token`, what
//! `kubectl create token` and, later, edged's projected volumes use) issues ES256-signed JWTs
//! with upstream's claims, and the authenticator accepts them as bearer tokens while they are
//! unexpired and the ServiceAccount (and the pod or secret they are bound to) still exists
//! with the same uid.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use crate::auth::Identity;

/// The issuer K3s uses, and so what in-cluster clients expect.
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Shortest and default lifetimes (upstream: 10 minutes minimum, 1 hour default).
pub const MIN_EXPIRATION: i64 = 600;
pub const DEFAULT_EXPIRATION: i64 = 3600;

pub struct TokenIssuer {
    key: EcdsaKeyPair,
    public: Vec<u8>,
    issuer: String,
    key_id: String,
    rng: SystemRandom,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the service account signing key is not an ECDSA P-256 PKCS#8 key: {0}")]
    Key(String),
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod or secret the token is bound to: (kind, name, uid).
    pub bound: Option<(String, String, String)>,
}

impl Claims {
    pub fn identity(&self) -> Identity {
        let mut id = Identity::new(
            format!("system:serviceaccount:{}:{}", self.namespace, self.name),
            &["system:serviceaccounts", "system:authenticated"],
        );
        id.groups
            .insert(1, format!("system:serviceaccounts:{}", self.namespace));
        id
    }
}

impl TokenIssuer {
    /// From a PKCS#8 (DER) ECDSA P-256 key.
    pub fn new(pkcs8: &[u8], issuer: &str) -> Result<Self, TokenError> {
        let rng = SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
                .map_err(|e| TokenError::Key(e.to_string()))?;
        let public = key.public_key().as_ref().to_vec();
        let key_id = URL_SAFE_NO_PAD.encode(
            &sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&public))[..16],
        );
        Ok(TokenIssuer {
            key,
            public,
            issuer: issuer.to_string(),
            key_id,
            rng,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// A signed token for the ServiceAccount, valid from `now` for `seconds`.
    pub fn issue(&self, claims: &Claims, audiences: &[String], now: i64, seconds: i64) -> String {
        let header = json!({"alg": "ES256", "kid": self.key_id});
        let mut k8s = json!({"namespace": claims.namespace, "serviceaccount": {"name": claims.name, "uid": claims.uid}});
        if let Some((kind, name, uid)) = &claims.bound {
            k8s[kind.to_lowercase()] = json!({"name": name, "uid": uid});
        }
        let payload = json!({
            "aud": audiences, "exp": now + seconds, "iat": now, "nbf": now, "iss": self.issuer,
            "sub": format!("system:serviceaccount:{}:{}", claims.namespace, claims.name),
            "kubernetes.io": k8s,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let signature = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map(|s| s.as_ref().to_vec())
            .unwrap_or_default();
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// The claims of a token this issuer signed, if it is unexpired and meant for `audience`.
    pub fn verify(&self, token: &str, audience: &str, now: i64) -> Option<Claims> {
        let mut parts = token.split('.');
        let (h, p, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let signature_bytes = URL_SAFE_NO_PAD.decode(s).ok()?;
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.public)
            .verify(format!("{h}.{p}").as_bytes(), &signature_bytes)
            .ok()?;
        let payload: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).ok()?).ok()?;
        if payload["iss"] != self.issuer {
            return None;
        }
        let exp = payload["exp"].as_i64()?;
        let nbf = payload["nbf"].as_i64().unwrap_or(0);
        if now >= exp || now + 60 < nbf {
            return None;
        }
        let audiences: Vec<&str> = match &payload["aud"] {
            Value::String(a) => vec![a.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !audiences.contains(&audience) {
            return None;
        }
        let k8s = &payload["kubernetes.io"];
        let bound = ["pod", "secret", "node"].iter().find_map(|kind| {
            let b = k8s.get(*kind)?;
            let capitalized = match *kind {
                "pod" => "Pod",
                "secret" => "Secret",
                _ => "Node",
            };
            Some((
                capitalized.to_string(),
                b["name"].as_str()?.to_string(),
                b["uid"].as_str()?.to_string(),
            ))
        });
        Some(Claims {
            namespace: k8s["namespace"].as_str()?.to_string(),
            name: k8s["serviceaccount"]["name"].as_str()?.to_string(),
            uid: k8s["serviceaccount"]["uid"].as_str()?.to_string(),
            bound,
        })
    }
}

/// Whether a bearer token looks like a JWT (three base64url parts).
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("eyJ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> TokenIssuer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        TokenIssuer::new(pkcs8.as_ref(), DEFAULT_ISSUER).unwrap()
    }

    fn claims() -> Claims {
        Claims {
            namespace: "apps".into(),
            name: "builder".into(),
            uid: "u-1".into(),
            bound: Some(("Pod".into(), "p".into(), "u-2".into())),
        }
    }

    #[test]
    fn issued_tokens_verify_until_they_expire() {
        let i = issuer();
        let token = i.issue(&claims(), &[DEFAULT_ISSUER.to_string()], 1_000, 600);
        assert!(looks_like_jwt(&token));
        assert_eq!(i.verify(&token, DEFAULT_ISSUER, 1_100), Some(claims()));
        assert_eq!(i.verify(&token, DEFAULT_ISSUER, 1_600), None, "expired");
        assert_eq!(i.verify(&token, "vault", 1_100), None, "other audience");
        assert_eq!(
            claims().identity().user,
            "system:serviceaccount:apps:builder"
        );
        assert_eq!(claims().identity().groups[1], "system:serviceaccounts:apps");
    }

    #[test]
    fn tampered_or_foreign_tokens_fail() {
        let (a, b) = (issuer(), issuer());
        let token = a.issue(&claims(), &[DEFAULT_ISSUER.to_string()], 1_000, 600);
        assert_eq!(b.verify(&token, DEFAULT_ISSUER, 1_100), None, "another key");
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        let mut payload: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
        payload["kubernetes.io"]["namespace"] = json!("kube-system");
        parts[1] = URL_SAFE_NO_PAD.encode(payload.to_string());
        assert_eq!(a.verify(&parts.join("."), DEFAULT_ISSUER, 1_100), None);
        assert_eq!(a.verify("not.a.token", DEFAULT_ISSUER, 1_100), None);
    }
}
