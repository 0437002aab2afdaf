//! Bidirectional byte relay between a client and a broker that holds no buffer while the
//! connection is idle. A 16 KiB buffer is borrowed from a per-thread pool only while bytes are
//! in flight and returned as soon as a read finds nothing to do, so a million idle devices cost
//! only their sockets and TLS state. Half-close is forwarded: EOF from one side shuts down the
//! write side of the other, and the other direction keeps flowing until it ends too. Bytes
//! followed at once by their direction's EOF leave in one TCP segment with the FIN
//! ([`WriteLast`]): an MQTT DISCONNECT and the close that follows it cost the broker one
//! segment, not two.
//!
//! Each direction follows the MQTT packet boundaries of its stream as the bytes pass
//! ([`Boundary`], 4 bytes, nothing buffered), so that a planned close ([`Relay::plan`]) can
//! stop reading at the next boundary, write a DISCONNECT and close, within a bounded wait.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::boundary::{Boundary, Disconnect};

/// One TLS record's worth of plaintext: a read fills at most this much.
pub const BUF_SIZE: usize = 16 * 1024;
/// Spare buffers kept per worker thread; beyond it they go back to the allocator.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buf(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    });
}

/// Frees this thread's spare buffers: after a storm of traffic they would otherwise stay with
/// the thread for good (up to [`POOL_MAX`] × [`BUF_SIZE`] per worker).
pub fn release_spare_buffers() {
    POOL.with(|p| *p.borrow_mut() = Vec::new());
}

/// A writer whose last bytes can leave together with the end of the stream.
pub trait WriteLast: AsyncWrite {
    /// Like `poll_write`, for bytes the caller follows at once with `poll_shutdown`, without a
    /// flush between: a TCP socket holds them back (`MSG_MORE`) so that the FIN rides in their
    /// segment. By default an ordinary write.
    fn poll_write_last(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write(cx, buf)
    }
}

impl WriteLast for TcpStream {
    fn poll_write_last(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let s = self.get_mut();
        loop {
            ready!(s.poll_write_ready(cx))?;
            let sent = s.try_io(Interest::WRITABLE, || {
                socket2::SockRef::from(&*s).send_with_flags(buf, libc::MSG_MORE | libc::MSG_NOSIGNAL)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

impl WriteLast for tokio::io::DuplexStream {}

impl<T: WriteLast + Unpin + ?Sized> WriteLast for &mut T {
    fn poll_write_last(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut **self.get_mut()).poll_write_last(cx, buf)
    }
}

/// Which end of one direction failed.
enum Fail {
    Read(io::Error),
    Write(io::Error),
}

/// One direction of the relay.
#[derive(Default)]
struct Half {
    /// Present only while bytes read from the source wait to be written.
    buf: Option<Box<[u8]>>,
    /// Offsets into `buf` (at most [`BUF_SIZE`]); 32 bits keep every idle task 16 B smaller.
    pos: u32,
    end: u32,
    read_done: bool,
    /// A read error met while reading ahead, returned once the bytes before it are written.
    read_err: Option<io::Error>,
    done: bool,
    /// Where the source's MQTT packets begin and end, advanced over every chunk read.
    at: Boundary,
    /// A planned close: read no further than the next packet boundary, then write this
    /// DISCONNECT as the last bytes and shut the write side down.
    stop: Option<Disconnect>,
    bytes: u64,
}

impl Half {
    /// Move bytes from `r` to `w` until `r` is pending (buffer released) or finished (the
    /// write side of `w` shut down).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<Result<(), Fail>>
    where
        R: AsyncRead + ?Sized,
        W: WriteLast + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            // Write out what is buffered; the last bytes before an EOF as such.
            if let Some(buf) = &self.buf {
                while self.pos < self.end {
                    let rest = &buf[self.pos as usize..self.end as usize];
                    let n = if self.read_done {
                        ready!(w.as_mut().poll_write_last(cx, rest))
                    } else {
                        ready!(w.as_mut().poll_write(cx, rest))
                    }
                    .map_err(Fail::Write)?;
                    if n == 0 {
                        return Poll::Ready(Err(Fail::Write(io::ErrorKind::WriteZero.into())));
                    }
                    self.pos += n as u32;
                    self.bytes += n as u64;
                }
            }
            if let Some(e) = self.read_err.take() {
                return Poll::Ready(Err(Fail::Read(e)));
            }
            if self.read_done {
                // Everything forwarded: pass the EOF on (FIN or TLS close_notify). Shutting
                // down flushes, and no flush before it lets the last bytes and the FIN go out
                // together.
                ready!(w.as_mut().poll_shutdown(cx)).map_err(Fail::Write)?;
                self.done = true;
                if let Some(buf) = self.buf.take() {
                    give_buf(buf);
                }
                continue;
            }
            // Closing on purpose: every byte read so far is written; read on only to the end of
            // the packet under way, then the DISCONNECT goes out as the last bytes.
            let mut limit = BUF_SIZE;
            if let Some(d) = self.stop {
                match self.at.to_boundary() {
                    Some(0) => {
                        let mut buf = self.buf.take().unwrap_or_else(take_buf);
                        let p = d.packet();
                        buf[..p.len()].copy_from_slice(p);
                        (self.pos, self.end) = (0, p.len() as u32);
                        self.buf = Some(buf);
                        self.read_done = true;
                        continue;
                    }
                    Some(n) => limit = n.min(BUF_SIZE),
                    // The stream stopped looking like MQTT: no DISCONNECT, a plain close.
                    None => {
                        self.stop = None;
                        self.done = true;
                        continue;
                    }
                }
            }
            let mut buf = self.buf.take().unwrap_or_else(take_buf);
            let mut rb = ReadBuf::new(&mut buf[..limit]);
            match r.as_mut().poll_read(cx, &mut rb) {
                Poll::Pending => {
                    // Nothing in flight: give the buffer back, keep only the waker. Flush
                    // what was written so a TLS layer does not sit on a partial record.
                    give_buf(buf);
                    ready!(w.as_mut().poll_flush(cx)).map_err(Fail::Write)?;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    give_buf(buf);
                    return Poll::Ready(Err(Fail::Read(e)));
                }
                Poll::Ready(Ok(())) => {
                    let mut n = rb.filled().len();
                    if n == 0 {
                        self.read_done = true;
                        // The source ended first: its end is passed on, without DISCONNECT.
                        self.stop = None;
                        give_buf(buf);
                        continue;
                    }
                    // Read on while more is at hand (no system call when there is not: the
                    // socket's readiness is known), so that an EOF right behind these bytes is
                    // seen before they are written. Not while closing: each read stops at the
                    // packet's end.
                    while self.stop.is_none() && n < buf.len() {
                        let mut rb = ReadBuf::new(&mut buf[n..]);
                        match r.as_mut().poll_read(cx, &mut rb) {
                            Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                                self.read_done = true;
                                break;
                            }
                            Poll::Ready(Ok(())) => n += rb.filled().len(),
                            Poll::Ready(Err(e)) => {
                                self.read_err = Some(e);
                                break;
                            }
                            Poll::Pending => break,
                        }
                    }
                    self.at.advance(&buf[..n]);
                    self.pos = 0;
                    self.end = n as u32;
                    self.buf = Some(buf);
                }
            }
        }
    }
}

/// Which side ended the relay first, for the close reason in the connection log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both directions reached EOF and were shut down cleanly.
    Clean,
    /// Reading from or writing to the client failed.
    ClientError,
    /// Reading from or writing to the broker failed.
    BrokerError,
    /// One direction had ended and the other moved no byte for the linger time: the peer
    /// that should still be sending is presumed gone (a device that lost power never
    /// sends its FIN).
    HalfCloseTimeout,
}

/// Bytes moved by a relay (written, a planned close's DISCONNECT included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Client → broker.
    pub up: u64,
    /// Broker → client.
    pub down: u64,
}

/// Relay until both directions have ended or one fails. Once one direction has ended, the
/// other must move a byte at least every `linger`, or the relay ends with
/// [`Ended::HalfCloseTimeout`].
/// Resolves to how it ended and the bytes moved; on error, bytes already accepted on the
/// healthy side have been written. `up_at` is where the client's stream stands in its packets
/// (after the CONNECT and what was pipelined behind it, sent before relaying); the broker's
/// starts with a packet.
pub fn relay<'a, C, B>(client: &'a mut C, broker: &'a mut B, up_at: Boundary, linger: Duration) -> Relay<'a, C, B>
where
    C: AsyncRead + WriteLast + Unpin + ?Sized,
    B: AsyncRead + WriteLast + Unpin + ?Sized,
{
    Relay {
        client,
        broker,
        up: Half { at: up_at, ..Half::default() },
        down: Half::default(),
        linger_ms: u32::try_from(linger.as_millis()).unwrap_or(u32::MAX),
        linger_timer: None,
        seen: 0,
    }
}

/// Where a relay stopped between packets of neither stream's making: the two streams'
/// positions in their MQTT packets, all a relay that goes on elsewhere needs
/// ([`Relay::park`], [`resume`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parked {
    up_at: Boundary,
    down_at: Boundary,
}

impl Parked {
    /// Where a relay starts: the client's stream at `up_at` (after the CONNECT and what was
    /// pipelined behind it), the broker's at a packet's start.
    pub fn start(up_at: Boundary) -> Parked {
        Parked { up_at, down_at: Boundary::START }
    }
}

/// A relay that goes on from where [`Relay::park`] left one, over the same streams (moved to
/// another runtime meanwhile). Its totals count from zero.
pub fn resume<'a, C, B>(client: &'a mut C, broker: &'a mut B, parked: Parked, linger: Duration) -> Relay<'a, C, B>
where
    C: AsyncRead + WriteLast + Unpin + ?Sized,
    B: AsyncRead + WriteLast + Unpin + ?Sized,
{
    let mut r = relay(client, broker, parked.up_at, linger);
    r.down.at = parked.down_at;
    r
}

/// The future of [`relay`]. Written out rather than an `async fn`: it is part of every idle
/// connection's task, and a generator would keep its arguments and the references its
/// closure captures besides these fields.
pub struct Relay<'a, C: ?Sized, B: ?Sized> {
    client: &'a mut C,
    broker: &'a mut B,
    up: Half,
    down: Half,
    /// The linger time in milliseconds: 4 bytes where a `Duration` takes 16.
    linger_ms: u32,
    /// Only exists once half-closed (or closing on purpose: then the bound on the wait for a
    /// packet boundary), so a connection relaying both ways holds no timer.
    linger_timer: Option<Pin<Box<Sleep>>>,
    /// Bytes moved (both ways together: the counts only grow, so the sum changes whenever
    /// one does) when the linger timer was last set.
    seen: u64,
}

impl<C, B> Relay<'_, C, B>
where
    C: AsyncRead + WriteLast + Unpin + ?Sized,
    B: AsyncRead + WriteLast + Unpin + ?Sized,
{
    /// Closes on purpose: `to_client` and `to_broker` are the DISCONNECTs each side is to get.
    /// A direction with one reads on to the end of the packet under way (never past it), writes
    /// it and shuts its write side down; a direction without one, or whose stream is no longer
    /// followed (half-closed, or its bytes stopped looking like MQTT), stops at once. Returns
    /// false when no direction has a DISCONNECT to write: the caller closes as it would have
    /// without one. Otherwise the relay resolves once both directions are done, or after
    /// `wait` (a peer stalled mid-packet), whichever comes first; [`Relay::sent`] says which
    /// DISCONNECTs went out.
    pub fn plan(&mut self, to_client: Option<Disconnect>, to_broker: Option<Disconnect>, wait: Duration) -> bool {
        for (half, d) in [(&mut self.down, to_client), (&mut self.up, to_broker)] {
            match d {
                Some(d) if !half.read_done && !half.done && half.at.to_boundary().is_some() => half.stop = Some(d),
                _ => half.done = true,
            }
        }
        if !self.closing() {
            return false;
        }
        let deadline = Instant::now() + wait;
        match &mut self.linger_timer {
            Some(t) => t.as_mut().reset(deadline),
            None => self.linger_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        true
    }

    /// Stops here if nothing is under way: no bytes read and not yet written, neither
    /// direction ended nor closing, no timer. Then the streams can be moved (their own state,
    /// a TLS record half received for one, moves with them) and the relay [`resume`]d
    /// elsewhere. `None` when something is under way: poll on and ask again later.
    pub fn park(&self) -> Option<Parked> {
        let idle = |h: &Half| h.buf.is_none() && !h.read_done && !h.done && h.read_err.is_none() && h.stop.is_none();
        (idle(&self.up) && idle(&self.down) && self.linger_timer.is_none())
            .then_some(Parked { up_at: self.up.at, down_at: self.down.at })
    }

    /// The DISCONNECTs a planned close wrote: to the client, to the broker.
    pub fn sent(&self) -> (Option<Disconnect>, Option<Disconnect>) {
        let sent = |h: &Half| h.stop.filter(|_| h.done);
        (sent(&self.down), sent(&self.up))
    }

    /// The bytes moved so far.
    pub fn totals(&self) -> Totals {
        Totals { up: self.up.bytes, down: self.down.bytes }
    }

    fn closing(&self) -> bool {
        self.up.stop.is_some() || self.down.stop.is_some()
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), (Ended, io::Error)>> {
        // Both directions are polled on every wake-up so one blocked direction never stalls
        // the other; an error is attributed to the side whose operation failed. Broker to
        // client first: the relay starts with the broker's CONNACK waiting, and a TLS client
        // stream sends what it owes (session tickets) with it rather than alone before it.
        let d = self.down.poll_copy(cx, Pin::new(&mut *self.broker), Pin::new(&mut *self.client));
        if let Poll::Ready(Err(f)) = d {
            return Poll::Ready(Err(match f {
                Fail::Read(e) => (Ended::BrokerError, e),
                Fail::Write(e) => (Ended::ClientError, e),
            }));
        }
        let u = self.up.poll_copy(cx, Pin::new(&mut *self.client), Pin::new(&mut *self.broker));
        if let Poll::Ready(Err(f)) = u {
            return Poll::Ready(Err(match f {
                Fail::Read(e) => (Ended::ClientError, e),
                Fail::Write(e) => (Ended::BrokerError, e),
            }));
        }
        if u.is_ready() && d.is_ready() {
            return Poll::Ready(Ok(()));
        }
        // A planned close's deadline is fixed: a peer trickling a packet cannot stretch it.
        let closing = self.closing();
        if u.is_ready() || d.is_ready() || closing {
            if !closing {
                let moved = self.up.bytes + self.down.bytes;
                let deadline = Instant::now() + Duration::from_millis(self.linger_ms.into());
                match &mut self.linger_timer {
                    Some(t) if moved != self.seen => t.as_mut().reset(deadline),
                    Some(_) => {}
                    None => self.linger_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
                self.seen = moved;
            }
            if let Some(t) = &mut self.linger_timer {
                if t.as_mut().poll(cx).is_ready() {
                    let what =
                        if closing { "no packet boundary in time" } else { "half-closed connection idle too long" };
                    let e = io::Error::new(io::ErrorKind::TimedOut, what);
                    return Poll::Ready(Err((Ended::HalfCloseTimeout, e)));
                }
            }
        }
        Poll::Pending
    }
}

impl<C, B> Future for Relay<'_, C, B>
where
    C: AsyncRead + WriteLast + Unpin + ?Sized,
    B: AsyncRead + WriteLast + Unpin + ?Sized,
{
    type Output = (Ended, Totals, Option<io::Error>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let res = ready!(this.step(cx));
        for half in [&mut this.up, &mut this.down] {
            if let Some(buf) = half.buf.take() {
                give_buf(buf);
            }
        }
        let totals = Totals { up: this.up.bytes, down: this.down.bytes };
        Poll::Ready(match res {
            Ok(()) => (Ended::Clean, totals, None),
            Err((side, e)) => (side, totals, Some(e)),
        })
    }
}

/// A stream wrapper for tests that logs how it is written to.
#[cfg(test)]
pub(crate) mod recording {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Op {
        Write(usize),
        Last(usize),
        Flush,
        Shutdown,
    }

    pub struct Recorder<S> {
        pub inner: S,
        pub log: Vec<Op>,
    }

    impl<S> Recorder<S> {
        pub fn new(inner: S) -> Self {
            Recorder { inner, log: Vec::new() }
        }
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
            self.log.push(Op::Write(n));
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.log.push(Op::Flush);
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.log.push(Op::Shutdown);
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    impl<S: AsyncWrite + Unpin> WriteLast for Recorder<S> {
        fn poll_write_last(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
            self.log.push(Op::Last(n));
            Poll::Ready(Ok(n))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::recording::{Op, Recorder};
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LINGER: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_relay_ends_when_the_other_side_stays_silent() {
        let (mut client, mut client_end) = tokio::io::duplex(1024);
        let (_broker, mut broker_end) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { relay(&mut client_end, &mut broker_end, Boundary::START, LINGER).await });
        client.write_all(b"bye").await.unwrap();
        client.shutdown().await.unwrap();
        // The broker never answers nor closes: with time paused, the runtime jumps to the
        // linger deadline once everything is idle.
        let (ended, totals, err) = task.await.unwrap();
        assert_eq!(ended, Ended::HalfCloseTimeout);
        assert_eq!(totals.up, 3);
        assert!(err.is_some());
    }

    #[tokio::test]
    async fn relays_both_ways_and_forwards_half_close() {
        let (mut client, mut client_end) = tokio::io::duplex(1024);
        let (mut broker, mut broker_end) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { relay(&mut client_end, &mut broker_end, Boundary::START, LINGER).await });

        let up: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let down: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 253) as u8).collect();
        let up2 = up.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&up2).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got_up = Vec::new();
        broker.read_to_end(&mut got_up).await.unwrap();
        assert_eq!(got_up, up);
        // The client has half-closed; the other direction still flows.
        broker.write_all(&down).await.unwrap();
        broker.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), down);
        let (ended, totals, err) = task.await.unwrap();
        assert_eq!(ended, Ended::Clean);
        assert!(err.is_none());
        assert_eq!(totals, Totals { up: up.len() as u64, down: down.len() as u64 });
    }

    #[tokio::test]
    async fn idle_relay_holds_no_buffer() {
        let (_client, mut client_end) = tokio::io::duplex(64);
        let (_broker, mut broker_end) = tokio::io::duplex(64);
        let mut up = Half::default();
        let mut down = Half::default();
        std::future::poll_fn(|cx| {
            assert!(up.poll_copy(cx, Pin::new(&mut client_end), Pin::new(&mut broker_end)).is_pending());
            assert!(down.poll_copy(cx, Pin::new(&mut broker_end), Pin::new(&mut client_end)).is_pending());
            Poll::Ready(())
        })
        .await;
        assert!(up.buf.is_none() && down.buf.is_none());
    }

    /// Bytes followed at once by their direction's EOF are written as the last ones, and the
    /// shutdown follows with no flush between (the FIN rides in their segment).
    #[tokio::test]
    async fn bytes_right_before_eof_go_out_as_the_last_write() {
        let (mut client, mut client_end) = tokio::io::duplex(1024);
        let (mut broker, broker_end) = tokio::io::duplex(1024);
        let mut broker_end = Recorder::new(broker_end);
        // DISCONNECT and the EOF are both at hand when the relay first reads.
        client.write_all(&[0xE0, 0x00]).await.unwrap();
        client.shutdown().await.unwrap();
        broker.shutdown().await.unwrap();
        let (ended, totals, err) = relay(&mut client_end, &mut broker_end, Boundary::START, LINGER).await;
        assert_eq!((ended, totals.up, err.is_none()), (Ended::Clean, 2, true));
        assert_eq!(broker_end.log, [Op::Last(2), Op::Shutdown]);
        let mut got = Vec::new();
        broker.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [0xE0, 0x00]);
    }

    /// Bytes with more to follow are ordinary writes, flushed when the source runs dry.
    #[tokio::test]
    async fn bytes_with_the_stream_still_open_are_ordinary_writes() {
        let (mut client, mut client_end) = tokio::io::duplex(1024);
        let (mut broker, broker_end) = tokio::io::duplex(1024);
        let mut broker_end = Recorder::new(broker_end);
        let task = tokio::spawn(async move {
            let r = relay(&mut client_end, &mut broker_end, Boundary::START, LINGER).await;
            (r, broker_end.log)
        });
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        broker.read_exact(&mut got).await.unwrap();
        client.shutdown().await.unwrap();
        broker.shutdown().await.unwrap();
        let ((ended, _, _), log) = task.await.unwrap();
        assert_eq!(ended, Ended::Clean);
        assert_eq!(log[..2], [Op::Write(4), Op::Flush]);
        assert_eq!(log.last(), Some(&Op::Shutdown));
    }

    /// A PUBLISH of `body` body bytes (a fixed header of 1 + 2 bytes).
    fn publish(body: usize) -> Vec<u8> {
        let mut p = vec![0x30, 0x80 | (body % 128) as u8, (body / 128) as u8];
        p.resize(3 + body, 7);
        p
    }

    /// A planned close in the middle of a packet from the broker: the rest of that packet is
    /// relayed, then the DISCONNECT, then the end of the stream; the broker's next packet is
    /// not read. The client's own stream, at a boundary, gets the DISCONNECT at once.
    #[tokio::test]
    async fn a_planned_close_waits_for_the_end_of_the_packet_under_way() {
        let (mut client, mut client_end) = tokio::io::duplex(1 << 16);
        let (mut broker, mut broker_end) = tokio::io::duplex(1 << 16);
        let p = publish(1000);
        broker.write_all(&p[..400]).await.unwrap();
        let mut relay = relay(&mut client_end, &mut broker_end, Boundary::START, LINGER);
        // Relay the first 400 bytes, then close on purpose.
        let mut got = vec![0u8; 400];
        std::future::poll_fn(|cx| {
            assert!(Pin::new(&mut relay).poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        client.read_exact(&mut got).await.unwrap();
        assert!(relay.plan(Some(Disconnect::UseAnotherServer), Some(Disconnect::Normal), LINGER));
        let rest = [&p[400..], &publish(10)[..]].concat();
        let writer = tokio::spawn(async move {
            broker.write_all(&rest).await.unwrap();
            let mut up = [0u8; 2];
            broker.read_exact(&mut up).await.unwrap();
            (broker, up)
        });
        let (_, totals, _) = (&mut relay).await;
        assert_eq!(relay.sent(), (Some(Disconnect::UseAnotherServer), Some(Disconnect::Normal)));
        assert_eq!(totals.down, 1003 + 4);
        drop(relay);
        let mut down = Vec::new();
        client.read_to_end(&mut down).await.unwrap();
        assert_eq!(&down[..603], &p[400..]);
        assert_eq!(&down[603..], Disconnect::UseAnotherServer.packet(), "then the DISCONNECT, then EOF");
        let (mut broker, up) = writer.await.unwrap();
        assert_eq!(up, [0xE0, 0x00]);
        // The broker's next PUBLISH was never read: it is still there.
        drop(broker_end);
        let mut left = Vec::new();
        broker.read_to_end(&mut left).await.unwrap();
        assert!(left.is_empty(), "the broker side got nothing more");
    }

    /// A peer stalled in the middle of a packet: the planned close gives up after its wait
    /// and writes no DISCONNECT (the caller closes plainly).
    #[tokio::test(start_paused = true)]
    async fn a_planned_close_gives_up_on_a_stalled_packet() {
        let (mut client, mut client_end) = tokio::io::duplex(1 << 16);
        let (mut broker, mut broker_end) = tokio::io::duplex(1 << 16);
        broker.write_all(&publish(1000)[..10]).await.unwrap();
        let mut relay = relay(&mut client_end, &mut broker_end, Boundary::START, LINGER);
        std::future::poll_fn(|cx| {
            assert!(Pin::new(&mut relay).poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        assert!(relay.plan(Some(Disconnect::ShuttingDown), None, Duration::from_secs(2)));
        let (ended, _, err) = (&mut relay).await;
        assert_eq!(ended, Ended::HalfCloseTimeout);
        assert!(err.is_some());
        assert_eq!(relay.sent(), (None, None));
        drop(relay);
        let mut got = [0u8; 10];
        client.read_exact(&mut got).await.unwrap();
    }

    /// Nothing to write (an MQTT 3.1.1 client with the Will kept), or a stream that stopped
    /// looking like MQTT: no planned close, the caller closes as before.
    #[tokio::test]
    async fn no_planned_close_without_a_disconnect_to_write_or_a_stream_to_follow() {
        let (_client, mut client_end) = tokio::io::duplex(64);
        let (_broker, mut broker_end) = tokio::io::duplex(64);
        let mut r = relay(&mut client_end, &mut broker_end, Boundary::START, LINGER);
        assert!(!r.plan(None, None, LINGER));
        let mut lost = Boundary::START;
        lost.advance(&[0x00]);
        let mut r = relay(&mut client_end, &mut broker_end, lost, LINGER);
        assert!(!r.plan(None, Some(Disconnect::Normal), LINGER), "the client's stream is not followed");
    }

    /// A reader that yields its bytes and then fails.
    struct FailsAfter(Option<&'static [u8]>);

    impl AsyncRead for FailsAfter {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(match self.0.take() {
                Some(b) => {
                    buf.put_slice(b);
                    Ok(())
                }
                None => Err(io::ErrorKind::ConnectionReset.into()),
            })
        }
    }

    impl AsyncWrite for FailsAfter {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl WriteLast for FailsAfter {}

    /// An error met while reading ahead is reported only after the bytes read before it are
    /// written: nothing accepted for relaying is lost.
    #[tokio::test]
    async fn bytes_before_a_read_error_are_written_first() {
        let mut client = FailsAfter(Some(b"last words"));
        let (mut broker, mut broker_end) = tokio::io::duplex(1024);
        let (ended, totals, err) = relay(&mut client, &mut broker_end, Boundary::START, LINGER).await;
        assert_eq!(ended, Ended::ClientError);
        assert_eq!(err.unwrap().kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(totals.up, 10);
        drop(broker_end);
        let mut got = Vec::new();
        broker.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
    }

    /// Over TCP the last bytes are held back for the FIN and still arrive, then the EOF.
    #[tokio::test]
    async fn tcp_last_bytes_then_shutdown_arrive_with_eof() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut b, _) = l.accept().await.unwrap();
        let n = std::future::poll_fn(|cx| Pin::new(&mut a).poll_write_last(cx, &[0xE0, 0x00])).await.unwrap();
        assert_eq!(n, 2);
        a.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [0xE0, 0x00]);
    }
}
