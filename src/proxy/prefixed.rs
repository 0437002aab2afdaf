//! [`Prefixed`]: a stream that first hands out bytes already read from it (what followed an
//! inbound PROXY header, or a WebSocket upgrade), then reads on. The one place those read-ahead
//! bytes are kept, so each stream that reads ahead need not carry its own copy of the loop.
//! Its own module, not `stream.rs`: `websocket.rs` wraps its inner stream in it, and the
//! WebSocket fuzz target compiles only the modules `websocket.rs` needs.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::relay::WriteLast;

/// A stream that first yields bytes already read, then reads `inner`. Writes pass through.
///
/// The bytes are a boxed slice and a position, 24 bytes like a bare `Vec`: a session that
/// wraps its stream in it while idle carries no more than one that kept a `Vec` of its own.
pub struct Prefixed<S> {
    pre: Box<[u8]>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `pre` is handed out first; capacity beyond its length is given back now (callers pass
    /// vectors of exactly their length, so nothing moves).
    pub fn new(pre: Vec<u8>, inner: S) -> Self {
        Prefixed { pre: pre.into_boxed_slice(), pos: 0, inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Whether bytes read ahead are still to be handed out (and so held).
    pub fn has_unread(&self) -> bool {
        !self.pre.is_empty()
    }

    /// The bytes read ahead and not handed out yet, which are no longer kept: reads go
    /// straight to the inner stream from now on.
    pub fn take_unread(&mut self) -> Vec<u8> {
        let pre = std::mem::take(&mut self.pre);
        let pos = std::mem::replace(&mut self.pos, 0);
        if pos == 0 {
            pre.into_vec()
        } else {
            pre[pos..].to_vec()
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.pre.len() {
            let n = buf.remaining().min(self.pre.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.pre[start..start + n]);
            self.pos += n;
            if self.pos == self.pre.len() {
                // Free it: an idle connection should hold nothing it no longer needs.
                self.pre = Box::default();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: WriteLast + Unpin> WriteLast for Prefixed<S> {
    fn poll_write_last(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_last(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefixed_yields_its_bytes_first_then_frees_them() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Prefixed::new(b"pre".to_vec(), a);
        assert!(s.has_unread());
        b.write_all(b"rest").await.unwrap();
        drop(b);
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"prerest");
        assert!(!s.has_unread());
    }

    #[tokio::test]
    async fn unread_bytes_are_taken_from_where_reading_stopped() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Prefixed::new(b"abcdef".to_vec(), a);
        let mut two = [0u8; 2];
        s.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"ab");
        assert_eq!(s.take_unread(), b"cdef");
        assert!(!s.has_unread());
        assert!(s.take_unread().is_empty());
        // Reads now go to the inner stream.
        b.write_all(b"xy").await.unwrap();
        s.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"xy");
        let mut untouched = Prefixed::new(b"whole".to_vec(), tokio::io::empty());
        assert_eq!(untouched.take_unread(), b"whole");
    }

    /// What it costs a session to wrap its stream in it: no more than a `Vec` of its own.
    #[test]
    fn it_is_no_larger_than_a_vec_beside_the_stream() {
        assert_eq!(std::mem::size_of::<Prefixed<u64>>(), std::mem::size_of::<(Vec<u8>, u64)>());
    }
}
