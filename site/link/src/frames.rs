//! Frames: channel (one byte), length (u32, big endian), payload.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const STATUS: u8 = 3;
pub const RESIZE: u8 = 4;
pub const CLOSE: u8 = 255;

/// The largest payload a frame may carry. Writers chunk far below it (a container's output
/// arrives in pieces of at most 32 KiB); a length above it is a broken or hostile peer.
pub const MAX_FRAME: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("a frame announced {0} bytes, more than the {MAX_FRAME} a frame may carry")]
    TooLarge(usize),
    #[error("the stream ended in the middle of a frame")]
    Truncated,
    #[error("the stream failed: {0}")]
    Stream(String),
}

/// One frame.
pub fn frame(channel: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&[channel]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

/// Reads frames from a stream of byte chunks (a streaming HTTP body).
pub struct Frames<S> {
    body: S,
    buf: BytesMut,
}

impl<S, E> Frames<S>
where
    S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    pub fn new(body: S) -> Self {
        Frames {
            body,
            buf: BytesMut::new(),
        }
    }

    /// The next frame; `Ok(None)` at a clean end of the stream.
    pub async fn try_next(&mut self) -> Result<Option<(u8, Bytes)>, FrameError> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > MAX_FRAME {
                    return Err(FrameError::TooLarge(len));
                }
                if self.buf.len() >= 5 + len {
                    let channel = self.buf[0];
                    let _ = self.buf.split_to(5);
                    return Ok(Some((channel, self.buf.split_to(len).freeze())));
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(FrameError::Stream(e.to_string())),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(FrameError::Truncated),
            }
        }
    }

    /// The next frame; `None` at the end of the stream or when it is broken (the stream's user
    /// ends its side either way).
    pub async fn next(&mut self) -> Option<(u8, Bytes)> {
        self.try_next().await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::convert::Infallible;

    fn frames_of(
        chunks: Vec<Vec<u8>>,
    ) -> Frames<impl futures::Stream<Item = Result<Bytes, Infallible>> + Unpin> {
        Frames::new(futures::stream::iter(
            chunks.into_iter().map(|c| Ok(Bytes::from(c))),
        ))
    }

    #[tokio::test]
    async fn frames_split_across_chunks_come_out_whole() {
        let wire = [
            frame(STDOUT, b"hello"),
            frame(STDERR, b""),
            frame(CLOSE, &[STDIN]),
        ]
        .concat();
        let chunks = wire.chunks(3).map(<[u8]>::to_vec).collect();
        let mut frames = frames_of(chunks);
        assert_eq!(
            frames.try_next().await,
            Ok(Some((STDOUT, Bytes::from("hello"))))
        );
        assert_eq!(frames.try_next().await, Ok(Some((STDERR, Bytes::new()))));
        assert_eq!(
            frames.try_next().await,
            Ok(Some((CLOSE, Bytes::from(vec![STDIN]))))
        );
        assert_eq!(frames.try_next().await, Ok(None));
    }

    #[tokio::test]
    async fn a_length_above_the_limit_is_refused_before_buffering() {
        let mut header = vec![STDOUT];
        header.extend_from_slice(&(u32::MAX).to_be_bytes());
        let mut frames = frames_of(vec![header]);
        assert_eq!(
            frames.try_next().await,
            Err(FrameError::TooLarge(u32::MAX as usize))
        );
        let mut cut = frames_of(vec![frame(STDOUT, b"hello")[..7].to_vec()]);
        assert_eq!(cut.try_next().await, Err(FrameError::Truncated));
    }

    proptest! {
        #[test]
        fn any_bytes_end_in_frames_or_an_error(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                let total: usize = chunks.iter().map(Vec::len).sum();
                let mut frames = frames_of(chunks);
                let mut taken = 0;
                while let Ok(Some((_, payload))) = frames.try_next().await {
                    taken += 5 + payload.len();
                    assert!(taken <= total);
                }
            });
        }
    }
}
