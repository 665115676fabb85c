//! Authentication: who is asking. Client certificates (CN = user, O = groups) verified by the
//! TLS layer against the cluster CA, and bearer tokens from a static token file in kube-apiserver's
//! `--token-auth-file` format (`token,user,uid,"group1,group2"`). ServiceAccount tokens are
//! verified in [`crate::service_accounts`].

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{AUTHENTICATED, Identity};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("read token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path}, line {line}: expected token,user,uid[,\"groups\"]")]
    Format { path: String, line: usize },
}

/// Bearer tokens, kept only as SHA-256 digests.
#[derive(Debug, Default, Clone)]
pub struct TokenAuthenticator {
    tokens: HashMap<[u8; 32], Identity>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Splits one CSV line, honouring double quotes.
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    fields.push(current);
    fields
}

impl TokenAuthenticator {
    pub fn add(&mut self, token: &str, identity: Identity) {
        self.tokens.insert(digest(token), identity);
    }

    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut auth = TokenAuthenticator::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields = csv_fields(line);
            if fields.len() < 3 || fields[0].is_empty() || fields[1].is_empty() {
                return Err(AuthError::Format {
                    path: path.display().to_string(),
                    line: i + 1,
                });
            }
            let mut groups: Vec<String> = fields
                .get(3)
                .map(|g| {
                    g.split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            groups.push(AUTHENTICATED.into());
            auth.add(
                &fields[0],
                Identity {
                    user: fields[1].clone(),
                    uid: fields[2].clone(),
                    groups,
                    ..Identity::default()
                },
            );
        }
        Ok(auth)
    }

    /// The identity of an `Authorization: Bearer <token>` header value.
    pub fn authenticate(&self, authorization: &str) -> Option<Identity> {
        let token = authorization
            .strip_prefix("Bearer ")
            .or_else(|| authorization.strip_prefix("bearer "))?
            .trim();
        if token.is_empty() {
            return None;
        }
        self.tokens.get(&digest(token)).cloned()
    }
}

/// CN and O of a verified client certificate (DER).
/// A certificate's serial number, lowercase hex without leading zeros (as the site records a
/// node certificate's).
pub fn certificate_serial(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.tbs_certificate.serial.to_str_radix(16))
}

/// The same from a PEM certificate.
pub fn certificate_serial_pem(pem: &str) -> Option<String> {
    let der = rustls_pemfile::certs(&mut pem.as_bytes()).next()?.ok()?;
    certificate_serial(der.as_ref())
}

pub fn identity_from_certificate(der: &[u8]) -> Option<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let user = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())?
        .to_string();
    let mut groups: Vec<String> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(String::from))
        .collect();
    groups.push(AUTHENTICATED.into());
    Some(Identity {
        user,
        groups,
        ..Identity::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.csv");
        std::fs::write(
            &path,
            "# comment\nsecret1,alice,1,\"dev,ops\"\nsecret2,bob,2\n",
        )
        .unwrap();
        let auth = TokenAuthenticator::from_file(&path).unwrap();
        let alice = auth.authenticate("Bearer secret1").unwrap();
        assert_eq!(alice.user, "alice");
        assert_eq!(alice.groups, vec!["dev", "ops", "system:authenticated"]);
        assert!(auth.authenticate("Bearer nope").is_none());
        assert!(auth.authenticate("Basic secret1").is_none());
        std::fs::write(&path, "justonefield\n").unwrap();
        assert!(TokenAuthenticator::from_file(&path).is_err());
    }
}
