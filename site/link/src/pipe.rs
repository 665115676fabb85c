//! A byte pipe through one HTTP/2 stream: the request body carries one direction and the
//! response body the other. [`BodyIo`] turns such a pair into an `AsyncRead + AsyncWrite`, so a
//! whole HTTP/1.1 connection (upgrades included) can run inside one stream of a link.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures::channel::mpsc;
use futures::{SinkExt, Stream};
use http_body::{Body, Frame};

/// The writing half's body: what is written to a [`BodyIo`] comes out here.
pub struct PipeBody(mpsc::Receiver<Bytes>);

impl Body for PipeBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// Reads from a body, writes into a [`PipeBody`].
pub struct BodyIo<B> {
    body: B,
    pending: Bytes,
    done: bool,
    tx: mpsc::Sender<Bytes>,
}

/// The writing end of a pipe: what a [`BodyIo`] holding it writes comes out of the
/// [`PipeBody`] made with it.
pub struct Writer(mpsc::Sender<Bytes>);

/// A writer and the body its bytes come out of.
pub fn channel() -> (Writer, PipeBody) {
    let (tx, rx) = mpsc::channel(8);
    (Writer(tx), PipeBody(rx))
}

impl<B> BodyIo<B> {
    /// Reads `body`, writes into `writer`.
    pub fn new(body: B, writer: Writer) -> Self {
        BodyIo {
            body,
            pending: Bytes::new(),
            done: false,
            tx: writer.0,
        }
    }
}

impl<B> tokio::io::AsyncRead for BodyIo<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.done {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending = data;
                    }
                }
                // A reset stream reads as the end of the pipe.
                Some(Err(_)) | None => self.done = true,
            }
        }
    }
}

impl<B: Unpin> tokio::io::AsyncWrite for BodyIo<B> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let gone = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        ready!(self.tx.poll_ready(cx)).map_err(|_| gone())?;
        self.tx
            .start_send(Bytes::copy_from_slice(buf))
            .map_err(|_| gone())?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let _ = ready!(self.tx.poll_close_unpin(cx));
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_flow_both_ways() {
        let incoming = http_body_util::Full::new(bytes::Bytes::from_static(b"hello"));
        let (writer, out) = super::channel();
        let mut io = super::BodyIo::new(incoming, writer);
        let mut read = String::new();
        io.read_to_string(&mut read).await.unwrap();
        assert_eq!(read, "hello");
        io.write_all(b"world").await.unwrap();
        io.shutdown().await.unwrap();
        use http_body_util::BodyExt;
        let written = out.collect().await.unwrap().to_bytes();
        assert_eq!(&written[..], b"world");
    }
}
