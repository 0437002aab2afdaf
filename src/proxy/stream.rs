//! The stream wrappers a connection's client side is made of: [`Client`] (plain or TLS, one
//! type for the setup steps and the relay; raw MQTT or WebSocket) and [`Counted`] (bytes
//! counted as they are relayed, per [`Direction`]), over a [`Prefixed`] socket (bytes read past
//! an inbound PROXY header, handed on first). Each passes [`WriteLast`] through, so the last
//! bytes of a direction still leave with its FIN.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::prefixed::Prefixed;
use super::relay::WriteLast;
use super::tls_stream::TlsServerStream;
use super::websocket::WsStream;

/// The client side of a connection once set up: plain, or TLS (boxed: rustls' state is large,
/// and plain connections should not carry room for it), or either seen through WebSocket
/// frames (boxed too: raw MQTT connections carry no room for the frame state).
pub enum Client {
    Plain(Prefixed<TcpStream>),
    Tls(Box<TlsServerStream<Prefixed<TcpStream>>>),
    Ws(Box<WsStream<Client>>),
}

impl Client {
    /// The CONNECT is complete: setup buffers are no longer charged, frames no longer bounded
    /// by the CONNECT's limit.
    pub fn end_setup(&mut self) {
        match self {
            Client::Plain(_) => {}
            Client::Tls(tls) => tls.end_setup(),
            Client::Ws(ws) => {
                ws.end_setup();
                ws.inner_mut().end_setup();
            }
        }
    }

    /// Moves the socket under every layer to the current runtime ([`rehome`]).
    pub fn rehome(&mut self) -> io::Result<()> {
        match self {
            Client::Plain(s) => rehome(s.get_mut()),
            Client::Tls(s) => rehome(s.get_mut().get_mut()),
            Client::Ws(s) => s.inner_mut().rehome(),
        }
    }
}

/// Registers `s`'s socket with the current runtime's I/O driver in place of the one it was
/// registered with, so that its readiness wakes tasks there without a trip through the other
/// runtime's thread. The socket itself stays as it is: a second descriptor for it is
/// registered here, then the first is deregistered from the old driver and closed. Call
/// within the runtime that polls `s` from now on, between reads and writes (no wake-up is
/// lost: registering reports the socket's readiness as it stands).
pub fn rehome(s: &mut TcpStream) -> io::Result<()> {
    use std::os::fd::AsFd;
    let fd = s.as_fd().try_clone_to_owned()?;
    *s = TcpStream::from_std(std::net::TcpStream::from(fd))?;
    Ok(())
}

impl AsyncRead for Client {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Client::Ws(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Client {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Client::Ws(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_flush(cx),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Client::Ws(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Client::Ws(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl WriteLast for Client {
    fn poll_write_last(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_write_last(cx, buf),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_write_last(cx, buf),
            Client::Ws(s) => Pin::new(s.as_mut()).poll_write_last(cx, buf),
        }
    }
}

/// Which way relayed bytes flow; the `direction` label of `relayed_bytes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToBroker,
    BrokerToClient,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToBroker => "client_to_broker",
            Direction::BrokerToClient => "broker_to_client",
        }
    }
}

/// A stream that adds the bytes read from it to a counter as they arrive, so that
/// `relayed_bytes_total` moves while long-lived connections relay, not only when they end.
/// Writes pass through untouched.
pub struct Counted<S> {
    inner: S,
    counter: IntCounter,
}

impl<S> Counted<S> {
    pub fn new(inner: S, counter: IntCounter) -> Self {
        Counted { inner, counter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.counter.inc_by(n as u64);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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

impl<S: WriteLast + Unpin> WriteLast for Counted<S> {
    fn poll_write_last(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_last(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::metrics::Metrics;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counted_counts_what_is_read_as_it_is_read() {
        let m = Metrics::new();
        let counter = m.relayed_bytes("l", Direction::ClientToBroker);
        let (a, mut b) = tokio::io::duplex(64);
        let mut counted = Counted::new(a, counter.clone());
        b.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 16];
        let n = counted.read(&mut buf).await.unwrap();
        assert_eq!((n, counter.get()), (5, 5));
        counted.write_all(b"not counted").await.unwrap();
        b.write_all(b"more").await.unwrap();
        drop(b);
        let mut rest = Vec::new();
        counted.read_to_end(&mut rest).await.unwrap();
        assert_eq!(counter.get(), 9);
    }
}
