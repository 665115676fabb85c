//! The server side of SPDY/3.1 as kubectl uses it for `exec`, `attach` and `port-forward`
//! (Go's spdystream is the client): the peer opens streams with SYN_STREAM (header blocks
//! compressed with zlib and the SPDY/3 dictionary, one compression context per direction for
//! the whole session), each is answered with a SYN_REPLY, and data flows in DATA frames until a
//! FIN or RST_STREAM. PINGs are echoed; SETTINGS and WINDOW_UPDATE are accepted and ignored:
//! spdystream does not enforce flow-control windows, and TCP paces both sides.
//!
//! [`serve`] runs a session over any byte stream (an upgraded HTTP/1.1 connection, or the
//! byte stream inside a WebSocket for kubectl 1.31+'s tunnelled port-forward) and hands each
//! stream the peer opens to the caller as a [`Stream`].

use std::collections::HashMap;
use std::sync::LazyLock;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status CANCEL.
const CANCEL: u32 = 5;
/// Larger control frames are refused (header blocks of kubectl's streams are tiny).
const MAX_CONTROL: usize = 1 << 20;
/// Data frames carry at most this much (the 24-bit length allows more; peers buffer less).
const MAX_DATA: usize = 32 * 1024;

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00, section 2.6.10.1):
/// length-prefixed header names and values, then a run of common value text.
pub static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
        "502504505",
        "203 Non-Authoritative Information",
        "204 No Content",
        "301 Moved Permanently",
        "400 Bad Request",
        "401 Unauthorized",
        "403 Forbidden",
        "404 Not Found",
        "500 Internal Server Error",
        "501 Not Implemented",
        "503 Service Unavailable",
        "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
        "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,",
        "application/xhtml+xml,text/plain,text/javascript,public",
        "private",
        "max-age=",
        "gzip,deflate,sdch",
        "charset=utf-8",
        "charset=iso-8859-1,utf-,*,enq=0.",
    );
    let mut d = Vec::new();
    for w in WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(TAIL.as_bytes());
    d
});

/// One stream the peer opened.
pub struct Stream {
    pub id: u32,
    /// Header names are lower case (SPDY/3 requires it).
    pub headers: Vec<(String, String)>,
    /// What the peer sends on it; ends at its FIN or RST_STREAM (or when the session ends).
    pub data: mpsc::Receiver<Bytes>,
    pub out: StreamSender,
}

impl Stream {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

enum Out {
    Reply(u32),
    Data(u32, Bytes, bool),
    Rst(u32),
    Ping(u32),
    GoAway,
}

/// Writes to one stream (or, with [`StreamSender::close_session`], ends the session).
#[derive(Clone)]
pub struct StreamSender {
    id: u32,
    tx: mpsc::Sender<Out>,
}

impl StreamSender {
    /// Queues `data` on the stream (waiting while the connection is busy); false once the
    /// session is gone.
    pub async fn send(&self, data: Bytes) -> bool {
        let mut rest = data;
        while rest.len() > MAX_DATA {
            let chunk = rest.split_to(MAX_DATA);
            if self
                .tx
                .send(Out::Data(self.id, chunk, false))
                .await
                .is_err()
            {
                return false;
            }
        }
        self.tx.send(Out::Data(self.id, rest, false)).await.is_ok()
    }

    /// Half-closes the stream (FIN): nothing more will be sent on it.
    pub async fn finish(&self) {
        let _ = self.tx.send(Out::Data(self.id, Bytes::new(), true)).await;
    }

    pub async fn reset(&self) {
        let _ = self.tx.send(Out::Rst(self.id)).await;
    }

    /// Sends GOAWAY after everything queued and closes the connection.
    pub async fn close_session(&self) {
        let _ = self.tx.send(Out::GoAway).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Header blocks, compressed for the wire and back (one zlib context per direction).
/// The most a header block may inflate to (a zlib bomb of a few KiB would otherwise expand
/// without limit).
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;

pub struct HeaderCodec {
    inflate: Decompress,
    deflate: Compress,
}

impl Default for HeaderCodec {
    fn default() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(&DICTIONARY)
            .expect("a fresh zlib stream takes a dictionary");
        HeaderCodec {
            inflate: Decompress::new(true),
            deflate,
        }
    }
}

impl HeaderCodec {
    pub fn decode(&mut self, compressed: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
        let bad = |m: String| SpdyError::Protocol(format!("header block: {m}"));
        let mut out: Vec<u8> = Vec::with_capacity(256);
        let start = self.inflate.total_in();
        loop {
            let used = (self.inflate.total_in() - start) as usize;
            if used >= compressed.len() && out.len() < out.capacity() {
                break;
            }
            if out.len() > MAX_HEADER_BLOCK {
                return Err(bad(format!(
                    "inflates to more than {MAX_HEADER_BLOCK} bytes"
                )));
            }
            out.reserve(1024);
            match self
                .inflate
                .decompress_vec(&compressed[used..], &mut out, FlushDecompress::Sync)
            {
                Ok(_) => {
                    let now_used = (self.inflate.total_in() - start) as usize;
                    if now_used >= compressed.len() && out.len() < out.capacity() {
                        break;
                    }
                    if now_used == used && out.len() < out.capacity() {
                        return Err(bad("truncated".into()));
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(&DICTIONARY)
                        .map_err(|e| bad(e.to_string()))?;
                }
                Err(e) => return Err(bad(e.to_string())),
            }
        }
        parse_block(&out).ok_or_else(|| bad("malformed".into()))
    }

    pub fn encode(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut block = Vec::new();
        block.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (n, v) in headers {
            block.extend_from_slice(&(n.len() as u32).to_be_bytes());
            block.extend_from_slice(n.to_ascii_lowercase().as_bytes());
            block.extend_from_slice(&(v.len() as u32).to_be_bytes());
            block.extend_from_slice(v.as_bytes());
        }
        let mut out: Vec<u8> = Vec::with_capacity(block.len() + 64);
        let start = self.deflate.total_in();
        loop {
            let used = (self.deflate.total_in() - start) as usize;
            out.reserve(256);
            let _ = self
                .deflate
                .compress_vec(&block[used..], &mut out, FlushCompress::Sync);
            let now_used = (self.deflate.total_in() - start) as usize;
            if now_used >= block.len() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

fn parse_block(b: &[u8]) -> Option<Vec<(String, String)>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let u32_of = |s: &[u8]| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize;
    let count = u32_of(take(4)?);
    let mut out = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let n = u32_of(take(4)?);
        let name = String::from_utf8_lossy(take(n)?).to_ascii_lowercase();
        let n = u32_of(take(4)?);
        let value = String::from_utf8_lossy(take(n)?).into_owned();
        // Several values of one name are NUL-separated.
        for v in value.split('\0') {
            out.push((name.clone(), v.to_string()));
        }
    }
    Some(out)
}

fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + payload.len());
    f.extend_from_slice(&(0x8000u16 | 3).to_be_bytes());
    f.extend_from_slice(&kind.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(payload);
    f
}

/// Runs a SPDY session over `io`; returns the streams the peer opens and a sender for the
/// session (GOAWAY). The session ends when the peer closes the connection or after
/// [`StreamSender::close_session`].
pub fn serve<IO>(io: IO) -> (mpsc::Receiver<Stream>, StreamSender)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::channel(256);
    let (streams_tx, streams_rx) = mpsc::channel(16);
    let codec = std::sync::Arc::new(std::sync::Mutex::new(HeaderCodec::default()));
    tokio::spawn(write_loop(writer, out_rx, codec.clone()));
    let session = StreamSender {
        id: 0,
        tx: out_tx.clone(),
    };
    tokio::spawn(async move {
        if let Err(e) = read_loop(reader, out_tx, streams_tx, codec).await {
            tracing::debug!("spdy session ended: {e}");
        }
    });
    (streams_rx, session)
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    out: mpsc::Sender<Out>,
    streams: mpsc::Sender<Stream>,
    codec: std::sync::Arc<std::sync::Mutex<HeaderCodec>>,
) -> Result<(), SpdyError> {
    let mut open: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut head = [0u8; 8];
    loop {
        match reader.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let flags = head[4];
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        if head[0] & 0x80 == 0 {
            // DATA
            let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            reader.read_exact(&mut payload).await?;
            if let Some(tx) = open.get(&id)
                && !payload.is_empty()
                && tx.send(Bytes::from(payload)).await.is_err()
            {
                // The consumer is gone: the peer may keep sending; drop it quietly.
                open.remove(&id);
            }
            if flags & FLAG_FIN != 0 {
                open.remove(&id);
            }
            continue;
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        let kind = u16::from_be_bytes([head[2], head[3]]);
        if len > MAX_CONTROL {
            return Err(SpdyError::Protocol(format!("control frame of {len} bytes")));
        }
        let mut payload = vec![0u8; len];
        reader.read_exact(&mut payload).await?;
        if version != 3 {
            return Err(SpdyError::Protocol(format!("version {version}, want 3")));
        }
        let id_at = |at: usize| -> Result<u32, SpdyError> {
            payload
                .get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
                .ok_or_else(|| SpdyError::Protocol("short control frame".into()))
        };
        match kind {
            SYN_STREAM => {
                let id = id_at(0)?;
                let headers = {
                    let block = payload.get(10..).unwrap_or_default();
                    codec
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .decode(block)?
                };
                let (tx, rx) = mpsc::channel(64);
                if flags & FLAG_FIN == 0 {
                    open.insert(id, tx);
                }
                let _ = out.send(Out::Reply(id)).await;
                let stream = Stream {
                    id,
                    headers,
                    data: rx,
                    out: StreamSender {
                        id,
                        tx: out.clone(),
                    },
                };
                if streams.send(stream).await.is_err() {
                    return Ok(());
                }
            }
            RST_STREAM => {
                open.remove(&id_at(0)?);
            }
            HEADERS => {
                let id = id_at(0)?;
                {
                    let block = payload.get(4..).unwrap_or_default();
                    // Keep the decompression context in step even if we ignore them.
                    codec
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .decode(block)?;
                }
                if flags & FLAG_FIN != 0 {
                    open.remove(&id);
                }
            }
            PING => {
                let _ = out.send(Out::Ping(id_at(0)?)).await;
            }
            GOAWAY => return Ok(()),
            // SETTINGS, WINDOW_UPDATE, NOOP, CREDENTIAL.
            _ => {}
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut out: mpsc::Receiver<Out>,
    codec: std::sync::Arc<std::sync::Mutex<HeaderCodec>>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    while let Some(first) = out.recv().await {
        let mut next = Some(first);
        let mut goaway = false;
        while let Some(o) = next.take() {
            match o {
                Out::Reply(id) => {
                    let mut p = id.to_be_bytes().to_vec();
                    let block = codec.lock().unwrap_or_else(|e| e.into_inner()).encode(&[]);
                    p.extend_from_slice(&block);
                    buf.extend_from_slice(&control(SYN_REPLY, 0, &p));
                }
                Out::Data(id, data, fin) => {
                    buf.extend_from_slice(&id.to_be_bytes());
                    buf.push(if fin { FLAG_FIN } else { 0 });
                    buf.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
                    buf.extend_from_slice(&data);
                }
                Out::Rst(id) => {
                    let mut p = id.to_be_bytes().to_vec();
                    p.extend_from_slice(&CANCEL.to_be_bytes());
                    buf.extend_from_slice(&control(RST_STREAM, 0, &p));
                }
                Out::Ping(id) => buf.extend_from_slice(&control(PING, 0, &id.to_be_bytes())),
                Out::GoAway => {
                    buf.extend_from_slice(&control(GOAWAY, 0, &[0u8; 8]));
                    goaway = true;
                }
            }
            if goaway || buf.len() > 256 * 1024 {
                break;
            }
            next = out.try_recv().ok();
        }
        if writer.write_all(&buf).await.is_err() || writer.flush().await.is_err() {
            return;
        }
        buf.clear();
        if goaway {
            let _ = writer.shutdown().await;
            return;
        }
    }
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_the_specs() {
        // The zlib dictionary id (Adler-32) Go's and Chromium's SPDY/3 implementations check.
        let mut c = Compress::new(Compression::default(), true);
        let id = c.set_dictionary(&DICTIONARY).unwrap();
        assert_eq!(DICTIONARY.len(), 1423);
        assert_eq!(id, 0xe3c6_a7c2);
    }

    #[test]
    fn header_blocks_round_trip_across_a_session() {
        let mut ours = HeaderCodec::default();
        let mut theirs = HeaderCodec::default();
        // Two blocks in a row use the same compression context.
        for headers in [
            vec![
                ("streamType", "error"),
                ("port", "8080"),
                ("requestID", "0"),
            ],
            vec![("streamtype", "data"), ("port", "8080"), ("requestid", "0")],
            vec![],
        ] {
            let wire = ours.encode(&headers);
            let back = theirs.decode(&wire).unwrap();
            let want: Vec<(String, String)> = headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.to_string()))
                .collect();
            assert_eq!(back, want);
        }
    }

    #[tokio::test]
    async fn a_session_carries_streams_both_ways() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (mut streams, _session) = serve(server);
        let (mut read, mut write) = tokio::io::split(client);
        let mut codec = HeaderCodec::default();
        let mut replies = HeaderCodec::default();
        // SYN_STREAM id 1 with a header, then data with FIN.
        let mut p = 1u32.to_be_bytes().to_vec();
        p.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&codec.encode(&[("streamtype", "stdin")]));
        write.write_all(&control(SYN_STREAM, 0, &p)).await.unwrap();
        let mut data = 1u32.to_be_bytes().to_vec();
        data.push(FLAG_FIN);
        data.extend_from_slice(&5u32.to_be_bytes()[1..]);
        data.extend_from_slice(b"hello");
        write.write_all(&data).await.unwrap();
        let mut s = streams.recv().await.unwrap();
        assert_eq!(s.header("streamType"), Some("stdin"));
        assert_eq!(s.data.recv().await.unwrap(), Bytes::from_static(b"hello"));
        assert!(s.data.recv().await.is_none(), "FIN ends the stream");
        s.out.send(Bytes::from_static(b"world")).await;
        s.out.finish().await;
        // SYN_REPLY, then DATA "world", then an empty DATA with FIN.
        let mut head = [0u8; 8];
        read.read_exact(&mut head).await.unwrap();
        assert_eq!(u16::from_be_bytes([head[2], head[3]]), SYN_REPLY);
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let mut reply = vec![0u8; len];
        read.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply[..4], &1u32.to_be_bytes());
        assert_eq!(replies.decode(&reply[4..]).unwrap(), vec![]);
        read.read_exact(&mut head).await.unwrap();
        assert_eq!(&head[..4], &1u32.to_be_bytes());
        let mut body = [0u8; 5];
        read.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, b"world");
        read.read_exact(&mut head).await.unwrap();
        assert_eq!(head[4], FLAG_FIN);
    }
}
