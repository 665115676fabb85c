//! The accepting side: answer the dialing peer's upgrade, then call it over HTTP/2.

use std::future::Future;

use http::{HeaderMap, StatusCode, header};

use crate::LinkError;

/// Whether `headers` ask for an upgrade to `protocol`.
pub fn wants(headers: &HeaderMap, protocol: &str) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(protocol))
}

/// The `101 Switching Protocols` answer to an upgrade to `protocol`.
pub fn switching<B: Default>(protocol: &'static str) -> http::Response<B> {
    let mut response = http::Response::new(B::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, http::HeaderValue::from_static(protocol));
    headers.insert(
        header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    response
}

/// A connected peer: requests go to its HTTP/2 server as streams on its connection.
pub struct Peer<B> {
    sender: hyper::client::conn::http2::SendRequest<B>,
}

impl<B> Clone for Peer<B> {
    fn clone(&self) -> Self {
        Peer {
            sender: self.sender.clone(),
        }
    }
}

impl<B> Peer<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Sends one request to the peer.
    pub async fn call(
        &self,
        request: http::Request<B>,
    ) -> Result<http::Response<hyper::body::Incoming>, LinkError> {
        let mut sender = self.sender.clone();
        sender.ready().await.map_err(|_| LinkError::Closed)?;
        Ok(sender.send_request(request).await?)
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// Takes over an upgraded connection as the HTTP/2 client: the peer, and the connection's
/// future, which runs until the link closes (drive it; dropping it closes the link).
pub async fn handshake<B>(
    upgraded: hyper::upgrade::Upgraded,
) -> Result<(Peer<B>, impl Future<Output = Result<(), LinkError>>), LinkError>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Some(crate::KEEPALIVE))
            .keep_alive_timeout(crate::KEEPALIVE)
            .keep_alive_while_idle(true)
            .handshake::<_, B>(upgraded)
            .await?;
    Ok((Peer { sender }, async move {
        connection.await.map_err(LinkError::from)
    }))
}
