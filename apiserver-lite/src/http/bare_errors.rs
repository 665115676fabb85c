//! A Status body for the HTTP/1.1 errors hyper answers on its own.
//!
//! A request whose head hyper cannot parse never reaches the app: a URI longer than the
//! 65,534 bytes the `http` crate's URIs hold gets `414`, a head larger than hyper's read buffer
//! `431`, a malformed request line or header `400`, each with an empty body and the connection
//! closed. Clients then print a bare code ("the server responded with the status code 414 but
//! did not return more information"). [`StatusBodies`] wraps a connection's stream and replaces
//! exactly those responses, as hyper writes them, with the same code and a `Status` that says
//! what was wrong.
//!
//! Only a write that starts with hyper's own error head is touched: `HTTP/1.1 4xx ...` followed
//! by `connection: close` and `content-length: 0`. The app's errors always carry a Status body,
//! so none of its responses matches, and an HTTP/2 write starts with a frame header, never with
//! `HTTP/1.1` (that would be a frame of 4.7 MB).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose bare HTTP/1.1 error responses get a Status body.
pub struct StatusBodies<S> {
    inner: S,
    /// A replacement being written: its bytes, how many are written, and how many bytes of the
    /// caller's buffer it stands for.
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<S> StatusBodies<S> {
    pub fn new(inner: S) -> Self {
        StatusBodies {
            inner,
            pending: None,
        }
    }
}

/// The message for each code hyper answers on its own.
fn message(code: u16) -> Option<(&'static str, &'static str)> {
    Some(match code {
        400 => (
            "BadRequest",
            "the request could not be parsed as HTTP/1.1 (malformed request line or header)",
        ),
        414 => (
            "RequestURITooLong",
            "the request URI is longer than the 65534 bytes this server accepts; send long label or field selectors in fewer values, or list and filter on the client",
        ),
        431 => (
            "RequestHeaderFieldsTooLarge",
            "the request's header fields are too large for this server",
        ),
        _ => return None,
    })
}

/// When `buf` starts with one of hyper's bare error responses: that response again with a
/// Status body, and the length of the head it replaces.
fn replacement(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let rest = buf.strip_prefix(b"HTTP/1.1 4")?;
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let code: u16 = std::str::from_utf8(rest.get(..2)?)
        .ok()
        .and_then(|c| format!("4{c}").parse().ok())?;
    let (reason, text) = message(code)?;
    let headers: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    if headers.first() != Some(&"connection: close") || !headers.contains(&"content-length: 0") {
        return None;
    }
    let body = serde_json::to_vec(&serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": text,
        "reason": reason,
        "code": code,
    }))
    .ok()?;
    let mut out = format!("{status_line}\r\n");
    for header in headers {
        if header == "content-length: 0" {
            out.push_str("content-type: application/json\r\n");
            out.push_str(&format!("content-length: {}\r\n", body.len()));
        } else {
            out.push_str(header);
            out.push_str("\r\n");
        }
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    Some((out, end))
}

impl<S: AsyncRead + Unpin> AsyncRead for StatusBodies<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StatusBodies<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            match replacement(buf) {
                Some((bytes, stands_for)) => this.pending = Some((bytes, 0, stands_for)),
                None => return Pin::new(&mut this.inner).poll_write(cx, buf),
            }
        }
        // Writing the replacement; the caller's head counts as written once all of it is.
        let (bytes, written, stands_for) = this.pending.as_mut().expect("set above");
        while *written < bytes.len() {
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        let stands_for = *stands_for;
        this.pending = None;
        Poll::Ready(Ok(stands_for))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // One slice at a time, so that a head is always seen whole by `poll_write`: hyper
        // writes its error head as one slice.
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &**b);
        self.poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn only_hypers_bare_error_heads_are_replaced() {
        let bare = b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\ndate: Sat, 05 Dec 2026 06:13:48 GMT\r\n\r\n";
        let (out, stands_for) = replacement(bare).unwrap();
        assert_eq!(stands_for, bare.len());
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\nconnection: close\r\n"));
        assert!(head.contains("content-type: application/json"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("date: Sat"));
        let status: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["code"], 414);

        // The app's own responses, and codes hyper does not produce, pass untouched.
        for other in [
            &b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 12\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"\x00\x00\x04\x08\x00\x00\x00\x00\x00",
            b"HTTP/1.1 431",
        ] {
            assert!(replacement(other).is_none(), "{:?}", String::from_utf8_lossy(other));
        }
    }

    #[tokio::test]
    async fn a_replacement_is_written_whole_through_short_writes() {
        let (client, mut server) = tokio::io::duplex(7);
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut all = Vec::new();
            server.read_to_end(&mut all).await.unwrap();
            all
        });
        let mut stream = StatusBodies::new(client);
        stream
            .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        stream.shutdown().await.unwrap();
        drop(stream);
        let text = String::from_utf8(reader.await.unwrap()).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        let status: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(status["code"], 431);
    }
}
