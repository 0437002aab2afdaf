//! The generator's side of MQTT over WebSocket (`--websocket`): the HTTP/1.1 upgrade (checked
//! with harbormaster's own `check_broker_response`: a 101, the right `Sec-WebSocket-Accept`,
//! the subprotocol asked for), then [`WsClient`], a stream whose writes leave as masked binary
//! frames and whose reads yield the payloads of the server's frames.
//!
//! Cheap on purpose, since the generator shares a core with the sink: frames from the server
//! are decoded in place in the caller's buffer, masking is harbormaster's word-wise XOR over
//! the payload once it is copied into the one frame buffer (which is freed once written, as a held session needs
//! none), and the mask keys come from a per-connection xorshift generator seeded from the
//! system's random source.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use harbormaster::proxy::prefixed::Prefixed;
use harbormaster::proxy::websocket as hmws;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The subprotocol the generator asks for (MQTT §6).
pub const SUBPROTOCOL: &str = "mqtt";

/// Why an upgrade failed: the server answered something else than an acceptable 101.
#[derive(Debug)]
pub struct UpgradeRefused(pub String);

impl std::fmt::Display for UpgradeRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UpgradeRefused {}

/// Send the upgrade request for `path` to `host` and read the answer; the stream then carries
/// frames. Bytes read past the 101 (the server's first frames, if it sent any) are kept.
pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, path: &str, host: &str) -> io::Result<WsClient<S>> {
    let key = hmws::fresh_key();
    let req = hmws::broker_request(path, host, &key, Some(SUBPROTOCOL), b"");
    s.write_all(&req).await?;
    s.flush().await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        match hmws::check_broker_response(&buf, &key, Some(SUBPROTOCOL)) {
            Ok(None) => {}
            Ok(Some(len)) => {
                let pre = buf.split_off(len);
                return Ok(WsClient::new(s, pre));
            }
            Err(why) => return Err(io::Error::other(UpgradeRefused(why))),
        }
    }
}

/// Appends a masked frame (FIN set) carrying `payload`.
fn masked_frame(op: u8, payload: &[u8], key: [u8; 4], out: &mut Vec<u8>) {
    out.reserve(payload.len() + 14);
    let start = out.len();
    hmws::frame_header(op, payload.len(), out);
    out[start + 1] |= 0x80;
    out.extend_from_slice(&key);
    let at = out.len();
    out.extend_from_slice(payload);
    hmws::apply_mask(&mut out[at..], key, 0);
}

/// The server's frames, read: a header in at most 10 bytes, then its payload.
#[derive(Debug, Default)]
struct Reader {
    hdr: [u8; 10],
    hdr_len: u8,
    in_payload: bool,
    op: u8,
    left: u64,
    /// A control frame's payload, while it arrives.
    ctl: Vec<u8>,
    /// The payload of a ping to answer.
    pong: Option<Vec<u8>>,
    /// A close frame came (its code): the end of the stream.
    closed: Option<u16>,
}

fn bad(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Reader {
    fn header_len(&self) -> usize {
        if self.hdr_len < 2 {
            return 2;
        }
        2 + match self.hdr[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        }
    }

    /// Decode `data` in place: the data frames' payload bytes are moved to its front and
    /// counted.
    fn decode(&mut self, data: &mut [u8]) -> io::Result<usize> {
        let (mut r, mut w) = (0usize, 0usize);
        while r < data.len() && self.closed.is_none() {
            if !self.in_payload {
                while (self.hdr_len as usize) < self.header_len() && r < data.len() {
                    self.hdr[self.hdr_len as usize] = data[r];
                    self.hdr_len += 1;
                    r += 1;
                }
                if (self.hdr_len as usize) < self.header_len() {
                    break;
                }
                let h = self.hdr;
                if h[1] & 0x80 != 0 {
                    return Err(bad("masked frame from the server"));
                }
                self.op = h[0] & 0x0f;
                self.left = match h[1] & 0x7f {
                    126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
                    127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                    n => u64::from(n),
                };
                match self.op {
                    OP_CONTINUATION | OP_BINARY => {}
                    OP_TEXT => return Err(bad("text frame from the server")),
                    OP_CLOSE | OP_PING | OP_PONG if self.left <= 125 => self.ctl = Vec::new(),
                    _ => return Err(bad("bad frame from the server")),
                }
                self.hdr_len = 0;
                self.in_payload = true;
                if self.left == 0 {
                    self.end_frame();
                }
                continue;
            }
            let n = self.left.min((data.len() - r) as u64) as usize;
            if self.op == OP_CONTINUATION || self.op == OP_BINARY {
                data.copy_within(r..r + n, w);
                w += n;
            } else {
                self.ctl.extend_from_slice(&data[r..r + n]);
            }
            self.left -= n as u64;
            r += n;
            if self.left == 0 {
                self.end_frame();
            }
        }
        Ok(w)
    }

    fn end_frame(&mut self) {
        self.in_payload = false;
        let payload = std::mem::take(&mut self.ctl);
        match self.op {
            OP_PING => self.pong = Some(payload),
            OP_CLOSE => {
                self.closed = Some(if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 1000 })
            }
            _ => {}
        }
    }
}

/// A stream carried in WebSocket frames, from the client's side.
pub struct WsClient<S> {
    /// With the bytes read past the 101, decoded first.
    inner: Prefixed<S>,
    rd: Reader,
    /// Frames on their way out; allocated only while they are.
    out: Vec<u8>,
    out_pos: usize,
    close_sent: bool,
    rng: u64,
}

impl<S> WsClient<S> {
    fn new(inner: S, pre: Vec<u8>) -> WsClient<S> {
        let mut seed = [0u8; 8];
        // A failed draw leaves a fixed seed: the keys still vary from frame to frame.
        let _ = aws_lc_rs::rand::fill(&mut seed);
        WsClient {
            inner: Prefixed::new(pre, inner),
            rd: Reader::default(),
            out: Vec::new(),
            out_pos: 0,
            close_sent: false,
            rng: u64::from_ne_bytes(seed) | 1,
        }
    }

    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    fn key(&mut self) -> [u8; 4] {
        // xorshift64: a fresh key per frame for the price of three shifts.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x as u32).to_ne_bytes()
    }

    fn push(&mut self, op: u8, payload: &[u8]) {
        let key = self.key();
        masked_frame(op, payload, key, &mut self.out);
    }
}

impl<S: AsyncWrite + Unpin> WsClient<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out_pos = 0;
        if self.out.capacity() > 4096 {
            // A burst's frame is not kept by a session that goes back to idle.
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        Poll::Ready(Ok(()))
    }

    fn take_pong(&mut self) {
        if let Some(p) = self.rd.pong.take() {
            if !self.close_sent {
                self.push(OP_PONG, &p);
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsClient<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.rd.pong.is_some() {
                this.take_pong();
                if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if this.rd.closed.is_some() {
                return Poll::Ready(Ok(()));
            }
            let dst = buf.initialize_unfilled();
            if dst.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(dst);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            let k = this.rd.decode(&mut dst[..n])?;
            if k > 0 {
                buf.advance(k);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WsClient<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(this.poll_drain(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.take_pong();
        this.push(OP_BINARY, buf);
        // Started at once; what the socket does not take now goes at the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    /// A close frame (1000), then the end of the inner stream.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            ready!(this.poll_drain(cx))?;
            this.push(OP_CLOSE, &1000u16.to_be_bytes());
            this.close_sent = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_round_trips_at_every_length() {
        for len in [0usize, 1, 3, 7, 8, 9, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut f = Vec::new();
            masked_frame(OP_BINARY, &payload, [1, 2, 3, 4], &mut f);
            // The server's decoder accepts it and gives the payload back.
            let mut dec = hmws::Decoder::new(u64::MAX);
            let n = dec.decode(&mut f).unwrap();
            assert_eq!(&f[..n], &payload[..], "len {len}");
        }
    }

    #[test]
    fn server_frames_decode_at_every_split() {
        let mut stream = Vec::new();
        hmws::frame_header(OP_BINARY, 3, &mut stream);
        stream.extend_from_slice(b"abc");
        hmws::frame_header(OP_PING, 2, &mut stream);
        stream.extend_from_slice(b"hi");
        let big: Vec<u8> = (0..300).map(|i| i as u8).collect();
        hmws::frame_header(OP_BINARY, big.len(), &mut stream);
        stream.extend_from_slice(&big);
        hmws::frame_header(OP_CLOSE, 2, &mut stream);
        stream.extend_from_slice(&1000u16.to_be_bytes());
        let mut want = b"abc".to_vec();
        want.extend_from_slice(&big);
        for split in 0..stream.len() {
            let mut rd = Reader::default();
            let (mut a, mut b) = (stream[..split].to_vec(), stream[split..].to_vec());
            let mut got = Vec::new();
            let n = rd.decode(&mut a).unwrap();
            got.extend_from_slice(&a[..n]);
            let n = rd.decode(&mut b).unwrap();
            got.extend_from_slice(&b[..n]);
            assert_eq!(got, want, "split at {split}");
            assert_eq!(rd.pong.as_deref(), Some(&b"hi"[..]));
            assert_eq!(rd.closed, Some(1000));
        }
    }
}
