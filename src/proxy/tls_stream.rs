//! The server side of TLS over rustls' unbuffered API, as a tokio `AsyncRead + AsyncWrite`
//! stream. Unlike `tokio_rustls::server::TlsStream` (rustls' buffered API keeps a 4 KiB
//! receive buffer for the connection's whole life), this stream owns its buffers and holds
//! them only while bytes are in flight: an idle connection keeps its rustls state and nothing
//! else. Socket reads go through one per-thread scratch buffer; only an incomplete record is
//! kept between reads.
//!
//! Behaviour matches tokio-rustls where the relay can tell: a close_notify reads as EOF, a
//! TCP EOF without one is `UnexpectedEof`, shutdown sends close_notify and then a FIN, and a
//! failed handshake sends its alert before the error is returned.
//!
//! Until the connection's setup ends (its CONNECT is complete), the receive buffer's growth is
//! charged to the process's setup budget ([`super::budget`]) before it is allocated: clients
//! sending all but the last byte of large handshake records cannot hold memory beyond
//! `limits.max_setup_bytes`. A read beyond it fails with [`OverBudget`]. Established sessions
//! charge nothing.
//!
//! The server name (SNI) is the one rustls parsed from the ClientHello, however many records
//! the ClientHello spans: the listener's certificate resolver hands it over
//! ([`note_server_name`]), since rustls' unbuffered connection keeps it to itself.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::server::{ClientHello, ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError};
use rustls::{CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::budget::{OverBudget, SetupCharge};
use super::relay::WriteLast;

/// One socket read at most: a full TLS record with its header and tag, rounded up.
const READ_SIZE: usize = 18 * 1024;
/// Plaintext encrypted per `poll_write` at most (four full records).
const WRITE_CHUNK: usize = 4 * 16 * 1024;
/// Encrypted bytes waiting for the socket beyond which `poll_write` waits.
const TX_HIGH: usize = 64 * 1024;
/// Received bytes buffered while a handshake message is incomplete, at most (rustls allows
/// handshake messages up to 64 KiB).
const RX_MAX: usize = 80 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_SIZE].into_boxed_slice());
    /// The server name of the ClientHello being processed on this thread, as rustls handed it
    /// to the certificate resolver: `Some(None)` for a ClientHello without one.
    static HELLO_NAME: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

/// For the listener's certificate resolver ([`rustls::server::ResolvesServerCert`]): records
/// the server name rustls read from the ClientHello it is resolving (lowercased; none without
/// SNI or for an IP address) as the SNI of the connection being set up. rustls calls the
/// resolver for every ClientHello, resumed sessions included, from within the record
/// processing of [`TlsServerStream::accept`] on the same thread, so the name reaches that
/// connection and no other.
pub fn note_server_name(hello: &ClientHello<'_>) {
    HELLO_NAME.with(|n| *n.borrow_mut() = Some(hello.server_name().map(str::to_owned)));
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A server-side TLS stream over `IO` whose buffers exist only while bytes are in flight.
pub struct TlsServerStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// Received TLS bytes not processed yet (an incomplete record).
    rx: Vec<u8>,
    /// Encrypted bytes not written to `io` yet, from `tx_pos`.
    tx: Vec<u8>,
    tx_pos: usize,
    /// Decrypted bytes not read by the caller yet, from `plain_pos`.
    plain: Vec<u8>,
    plain_pos: usize,
    /// The peer sent close_notify.
    peer_closed: bool,
    /// `io` reached EOF.
    io_eof: bool,
    /// close_notify queued.
    close_sent: bool,
    /// rustls reported an error: the connection is dead, its alert (if any) queued in `tx`,
    /// and rustls is never called again (its state still refers to the input that failed).
    failed: bool,
    /// The SNI of the ClientHello, from the certificate resolver ([`note_server_name`]).
    sni: Option<String>,
    /// In setup: what `rx` is charged, and the limit (`max_setup_bytes`) it is checked against.
    setup: Option<(SetupCharge, usize)>,
}

/// Frees a buffer's memory once it has nothing left in it.
fn release(v: &mut Vec<u8>) {
    if v.is_empty() && v.capacity() > 0 {
        *v = Vec::new();
    }
}

impl<IO: AsyncRead + WriteLast + Unpin> TlsServerStream<IO> {
    /// Runs the server handshake over `io`. With `setup` (a charge and its limit), the receive buffer is charged until
    /// [`Self::end_setup`].
    pub async fn accept(config: Arc<ServerConfig>, io: IO, setup: Option<(SetupCharge, usize)>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
        let mut s = TlsServerStream {
            io,
            conn,
            rx: Vec::new(),
            tx: Vec::new(),
            tx_pos: 0,
            plain: Vec::new(),
            plain_pos: 0,
            peer_closed: false,
            io_eof: false,
            close_sent: false,
            failed: false,
            sni: None,
            setup,
        };
        loop {
            HELLO_NAME.with(|n| n.borrow_mut().take());
            let processed = s.process(None);
            if let Some(name) = HELLO_NAME.with(|n| n.borrow_mut().take()) {
                s.sni = name;
            }
            if let Err(e) = processed {
                // Last gasp: the alert that describes the failure.
                let _ = poll_fn(|cx| Poll::Ready(s.poll_write_tx(cx))).await;
                return Err(e);
            }
            if !s.conn.is_handshaking() {
                // What the last step produced (TLS 1.3 session tickets, TLS 1.2 server
                // Finished) goes out with the first write (the CONNACK: one segment and one
                // wake-up of the client fewer) or when a read has to wait, whichever is first.
                return Ok(s);
            }
            poll_fn(|cx| Poll::Ready(ready_or_pending(s.poll_write_tx(cx)))).await?;
            if s.peer_closed || s.io_eof {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed during the TLS handshake"));
            }
            // Waiting for the client, the flight written above keeps going out.
            poll_fn(|cx| {
                ready_or_pending(s.poll_write_tx(cx))?;
                s.poll_read_io(cx, None)
            })
            .await?;
        }
    }

    /// The negotiated connection: version, cipher suite, ALPN, client certificates.
    pub fn common(&self) -> &CommonState {
        &self.conn
    }

    /// The server name the client asked for (SNI), lowercased.
    pub fn server_name(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// The connection is set up: its buffers are no longer charged.
    pub fn end_setup(&mut self) {
        self.setup = None;
    }

    /// Makes room in `rx` for `more` bytes; in setup, the growth is charged first.
    fn reserve_rx(&mut self, more: usize) -> io::Result<()> {
        let need = self.rx.len() + more;
        if need <= self.rx.capacity() {
            return Ok(());
        }
        // Doubling, as `Vec` does, so that a trickle of bytes does not copy the buffer on
        // every read; never past what a largest incomplete message can need.
        let to = need.max((self.rx.capacity() * 2).min(RX_MAX + READ_SIZE));
        if let Some((charge, max)) = &mut self.setup {
            if !charge.grow_to(to, *max) {
                return Err(OverBudget::error());
            }
        }
        self.rx.reserve_exact(to - self.rx.len());
        Ok(())
    }

    /// Frees `rx` once it is empty, and gives back its charge.
    fn release_rx(&mut self) {
        release(&mut self.rx);
        if let Some((charge, _)) = &mut self.setup {
            if self.rx.capacity() < charge.held() {
                charge.set(self.rx.capacity());
            }
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The underlying stream, to move its socket to another runtime between reads.
    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    fn tx_pending(&self) -> bool {
        self.tx_pos < self.tx.len()
    }

    /// Drives rustls over the received bytes until it needs more input; decrypted records go
    /// to `plain`, TLS output to `tx`. With `data`, encrypts a first part of it once the
    /// connection may send application data and returns how much; with `close`, queues
    /// close_notify.
    fn process_io(&mut self, data: Option<&[u8]>, close: bool) -> Result<usize, rustls::Error> {
        let mut rx = std::mem::take(&mut self.rx);
        let r = self.process_buf(&mut rx, data, close, None);
        match r {
            Ok((consumed, _)) => {
                rx.drain(..consumed);
                self.rx = rx;
                self.release_rx();
            }
            // Nothing received will be looked at again.
            Err(_) => {
                drop(rx);
                self.release_rx();
            }
        }
        r.map(|(_, n)| n)
    }

    /// [`Self::process_io`] over `input`; returns the input bytes consumed and the plaintext
    /// encrypted. Decrypted records go straight into `out` while it has room and nothing is
    /// waiting in `plain` (one copy fewer on the bulk path). After an error the alert rustls
    /// queued for it is in `tx`, and every later call fails at once.
    fn process_buf(
        &mut self,
        input: &mut [u8],
        data: Option<&[u8]>,
        close: bool,
        out: Option<&mut ReadBuf<'_>>,
    ) -> Result<(usize, usize), rustls::Error> {
        if self.failed {
            return Err(rustls::Error::General("the TLS connection has failed".into()));
        }
        let r = self.process_records(input, data, close, out);
        if r.is_err() {
            self.failed = true;
            self.fetch_alert();
        }
        r
    }

    fn process_records(
        &mut self,
        input: &mut [u8],
        data: Option<&[u8]>,
        close: bool,
        mut out: Option<&mut ReadBuf<'_>>,
    ) -> Result<(usize, usize), rustls::Error> {
        let mut consumed = 0;
        let mut result = None;
        while result.is_none() {
            // Slicing off what was discarded is rustls' "remove from the front", without
            // moving the rest.
            let status = self.conn.process_tls_records(&mut input[consumed..]);
            let discard = status.discard;
            match status.state? {
                ConnectionState::ReadTraffic(mut rt) => {
                    while let Some(rec) = rt.next_record() {
                        let p = rec?.payload;
                        match out.as_deref_mut() {
                            Some(o) if self.plain.is_empty() => {
                                let k = o.remaining().min(p.len());
                                o.put_slice(&p[..k]);
                                self.plain.extend_from_slice(&p[k..]);
                            }
                            _ => self.plain.extend_from_slice(p),
                        }
                    }
                }
                ConnectionState::EncodeTlsData(mut enc) => encode(&mut self.tx, &mut enc)?,
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::PeerClosed => self.peer_closed = true,
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    result = Some(0);
                }
                ConnectionState::BlockedHandshake => result = Some(0),
                ConnectionState::WriteTraffic(mut w) => {
                    let mut n = 0;
                    if let Some(d) = data {
                        let d = &d[..d.len().min(WRITE_CHUNK)];
                        let start = self.tx.len();
                        // Each record adds a 5-byte header, a content type byte and a 16-byte tag.
                        self.tx.resize(start + d.len() + (d.len() / 16384 + 1) * 64, 0);
                        let written = match w.encrypt(d, &mut self.tx[start..]) {
                            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                                self.tx.resize(start + required_size, 0);
                                w.encrypt(d, &mut self.tx[start..])
                            }
                            r => r,
                        };
                        match written {
                            Ok(k) => {
                                self.tx.truncate(start + k);
                                n = d.len();
                            }
                            Err(e) => {
                                self.tx.truncate(start);
                                return Err(rustls::Error::General(e.to_string()));
                            }
                        }
                    } else if close && !self.close_sent {
                        let start = self.tx.len();
                        self.tx.resize(start + 64, 0);
                        match w.queue_close_notify(&mut self.tx[start..]) {
                            Ok(k) => self.tx.truncate(start + k),
                            Err(e) => {
                                self.tx.truncate(start);
                                return Err(rustls::Error::General(e.to_string()));
                            }
                        }
                        self.close_sent = true;
                    }
                    result = Some(n);
                }
                _ => return Err(rustls::Error::General("unexpected TLS state (early data)".into())),
            }
            consumed += discard;
        }
        Ok((consumed, result.unwrap_or(0)))
    }

    fn process(&mut self, data: Option<&[u8]>) -> io::Result<usize> {
        self.process_io(data, false).map_err(invalid)
    }

    /// After an error: encode the alert rustls queued for it, if any. rustls hands out what it
    /// has queued before it looks at any input, and is asked only while something is queued:
    /// otherwise it would go on to the handshake messages it still holds from the input that
    /// failed, which point into that buffer (given another, rustls panics).
    fn fetch_alert(&mut self) {
        while self.conn.wants_write() {
            let status = self.conn.process_tls_records(&mut []);
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    if encode(&mut self.tx, &mut enc).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// Reads once from `io`. `Ok` after some bytes or EOF. With `out` and nothing buffered in
    /// `rx`, the bytes are processed where they were read and records are decrypted straight
    /// into `out`; only an incomplete record is kept in `rx`. Otherwise they go to `rx`.
    fn poll_read_io(&mut self, cx: &mut Context<'_>, out: Option<&mut ReadBuf<'_>>) -> Poll<io::Result<()>> {
        if self.rx.len() >= RX_MAX {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "TLS message too large")));
        }
        let r = SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let mut rb = ReadBuf::new(&mut s[..]);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            let n = rb.filled().len();
            if n == 0 {
                self.io_eof = true;
            } else if self.rx.is_empty() && out.is_some() {
                match self.process_buf(&mut s[..n], None, false, out) {
                    Ok((consumed, _)) => {
                        if let Err(e) = self.reserve_rx(n - consumed) {
                            return Poll::Ready(Err(e));
                        }
                        self.rx.extend_from_slice(&s[consumed..n]);
                    }
                    Err(e) => return Poll::Ready(Err(invalid(e))),
                }
            } else {
                if let Err(e) = self.reserve_rx(n) {
                    return Poll::Ready(Err(e));
                }
                self.rx.extend_from_slice(&s[..n]);
            }
            Poll::Ready(Ok(()))
        });
        if r.is_ready() {
            self.release_rx();
        }
        r
    }

    /// Writes `tx` to `io` until it is empty (then frees it) or `io` is not ready.
    fn poll_write_tx(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send_tx(cx, false)
    }

    /// [`Self::poll_write_tx`]; with `last`, as the stream's last bytes, a shutdown following
    /// at once ([`WriteLast`]).
    fn poll_send_tx(&mut self, cx: &mut Context<'_>, last: bool) -> Poll<io::Result<()>> {
        while self.tx_pending() {
            let io = Pin::new(&mut self.io);
            let rest = &self.tx[self.tx_pos..];
            match if last { io.poll_write_last(cx, rest) } else { io.poll_write(cx, rest) } {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.tx_pos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.tx.clear();
        self.tx_pos = 0;
        release(&mut self.tx);
        Poll::Ready(Ok(()))
    }

    /// Encrypts what of `buf` rustls takes, and with `send` writes it out at once (what the
    /// socket does not take now goes out on flush or the next write).
    fn poll_encrypt(&mut self, cx: &mut Context<'_>, buf: &[u8], send: bool) -> Poll<io::Result<usize>> {
        if self.tx.len() - self.tx_pos >= TX_HIGH {
            match self.poll_write_tx(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if self.tx.len() - self.tx_pos >= TX_HIGH => return Poll::Pending,
                _ => {}
            }
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = self.process(Some(buf))?;
        if send {
            ready_or_pending(self.poll_write_tx(cx))?;
        }
        if n == 0 {
            // rustls would not take application data: the connection is closed both ways.
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Poll::Ready(Ok(n))
    }
}

/// Appends one encoded handshake or alert record to `tx`.
fn encode(tx: &mut Vec<u8>, enc: &mut EncodeTlsData<'_, ServerConnectionData>) -> Result<(), rustls::Error> {
    let start = tx.len();
    tx.resize(start + 1024, 0);
    let r = match enc.encode(&mut tx[start..]) {
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            tx.resize(start + required_size, 0);
            enc.encode(&mut tx[start..])
        }
        r => r,
    };
    match r {
        Ok(n) => {
            tx.truncate(start + n);
            Ok(())
        }
        Err(e) => {
            tx.truncate(start);
            Err(rustls::Error::General(e.to_string()))
        }
    }
}

/// `Pending` from a best-effort write is not an error: the waker is registered.
fn ready_or_pending(p: Poll<io::Result<()>>) -> io::Result<()> {
    match p {
        Poll::Ready(r) => r,
        Poll::Pending => Ok(()),
    }
}

impl<IO: AsyncRead + WriteLast + Unpin> AsyncRead for TlsServerStream<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Owed TLS output (tickets, a key update answer) is written before the read waits,
        // not before every read: it can then leave together with the next write.
        loop {
            if this.plain_pos < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_pos);
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                if this.plain_pos == this.plain.len() {
                    this.plain.clear();
                    this.plain_pos = 0;
                    release(&mut this.plain);
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.io_eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            if !this.rx.is_empty() {
                if let Err(e) = this.process(None) {
                    let _ = this.poll_write_tx(cx);
                    return Poll::Ready(Err(e));
                }
                if this.plain_pos < this.plain.len() || this.peer_closed {
                    continue;
                }
            }
            let before = buf.filled().len();
            match this.poll_read_io(cx, Some(buf)) {
                Poll::Pending => {
                    ready_or_pending(this.poll_write_tx(cx))?;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    let _ = this.poll_write_tx(cx);
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) => {
                    if buf.filled().len() > before {
                        return Poll::Ready(Ok(()));
                    }
                    if this.io_eof && !this.rx.is_empty() {
                        // Process what arrived before the EOF first.
                        this.process(None)?;
                        ready_or_pending(this.poll_write_tx(cx))?;
                    }
                }
            }
        }
    }
}

impl<IO: AsyncRead + WriteLast + Unpin> AsyncWrite for TlsServerStream<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_encrypt(cx, buf, true)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_write_tx(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// close_notify, then the FIN: both in the segment of whatever records are still
    /// waiting, when the socket takes them all at once.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A failed connection has no close_notify to send: its alert (if still waiting) and
        // the FIN end it.
        if !this.close_sent && !this.failed {
            this.process_io(None, true).map_err(invalid)?;
            this.close_sent = true;
        }
        std::task::ready!(this.poll_send_tx(cx, true))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<IO: AsyncRead + WriteLast + Unpin> WriteLast for TlsServerStream<IO> {
    /// Encrypts without writing: the records leave with close_notify and the FIN.
    fn poll_write_last(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_encrypt(cx, buf, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One certificate, resolved the way the listeners' resolver does: noting the SNI.
    #[derive(Debug)]
    struct Noting(Arc<rustls::sign::CertifiedKey>);

    impl rustls::server::ResolvesServerCert for Noting {
        fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
            note_server_name(&hello);
            Some(self.0.clone())
        }
    }

    fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        configs_for(rustls::DEFAULT_VERSIONS)
    }

    /// The client offers `versions` only.
    fn configs_for(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = rustls::pki_types::CertificateDer::from(ck.cert.der().to_vec());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let signing = provider.key_provider.load_private_key(key).unwrap();
        let certified = rustls::sign::CertifiedKey::new(vec![cert.clone()], signing);
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Noting(Arc::new(certified))));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    async fn pair(
        small: bool,
    ) -> (TlsServerStream<tokio::io::DuplexStream>, tokio_rustls::client::TlsStream<tokio::io::DuplexStream>) {
        let (server_cfg, client_cfg) = configs();
        let (a, b) = tokio::io::duplex(if small { 64 } else { 1 << 16 });
        let connector = tokio_rustls::TlsConnector::from(client_cfg);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (s, c) = tokio::join!(TlsServerStream::accept(server_cfg, a, None), connector.connect(name, b));
        (s.unwrap(), c.unwrap())
    }

    #[tokio::test]
    async fn both_ways_with_half_close_and_nothing_held_when_idle() {
        for small in [false, true] {
            let (mut s, mut c) = pair(small).await;
            // (Through the 64-byte pipe the session tickets may still wait in `tx`.)
            assert!(s.rx.capacity() == 0 && s.plain.capacity() == 0);
            let up: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let down: Vec<u8> = (0..150_000u32).map(|i| (i * 13 % 253) as u8).collect();
            let up2 = up.clone();
            let client = tokio::spawn(async move {
                c.write_all(&up2).await.unwrap();
                c.shutdown().await.unwrap();
                let mut got = Vec::new();
                c.read_to_end(&mut got).await.unwrap();
                got
            });
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, up, "small={small}");
            // The client has half-closed; the other direction still flows.
            s.write_all(&down).await.unwrap();
            s.shutdown().await.unwrap();
            assert_eq!(client.await.unwrap(), down);
            assert!(s.rx.capacity() == 0 && s.tx.capacity() == 0 && s.plain.capacity() == 0);
        }
    }

    /// The last bytes, close_notify and the FIN leave in one write followed by the shutdown,
    /// and the client reads the bytes and then a clean end.
    #[tokio::test]
    async fn last_bytes_and_close_notify_in_one_write() {
        let (server_cfg, client_cfg) = configs();
        let (a, b) = tokio::io::duplex(1 << 16);
        let connector = tokio_rustls::TlsConnector::from(client_cfg);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let a = crate::proxy::relay::recording::Recorder::new(a);
        let (s, c) = tokio::join!(TlsServerStream::accept(server_cfg, a, None), connector.connect(name, b));
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        s.flush().await.unwrap(); // the session ticket
        s.io.log.clear();
        let n = poll_fn(|cx| Pin::new(&mut s).poll_write_last(cx, b"bye")).await.unwrap();
        assert_eq!(n, 3);
        assert!(s.io.log.is_empty(), "encrypted, not written yet");
        s.shutdown().await.unwrap();
        use crate::proxy::relay::recording::Op;
        // One TLS 1.3 record of 3 bytes (5 + 3 + 1 + 16) and close_notify (5 + 2 + 1 + 16).
        assert_eq!(s.io.log, [Op::Last(25 + 24), Op::Shutdown]);
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        assert!(s.tx.capacity() == 0);
    }

    #[tokio::test]
    async fn sni_is_read_from_the_client_hello() {
        let (s, _c) = pair(false).await;
        assert_eq!(s.server_name(), Some("localhost"));
        assert!(s.common().protocol_version().is_some());
    }

    /// A ClientHello in several records (a client with a small maximum fragment size, or a
    /// long ALPN list): the server name is the one rustls read, not a guess from the first
    /// record; for TLS 1.2 and 1.3, and for a ClientHello without SNI.
    #[tokio::test]
    async fn sni_of_a_client_hello_spread_over_records() {
        for (frag, version, sni) in [
            (None, &rustls::version::TLS13, true),
            (Some(64), &rustls::version::TLS13, true),
            (Some(100), &rustls::version::TLS12, true),
            (Some(64), &rustls::version::TLS13, false),
        ] {
            let (server_cfg, client_cfg) = configs_for(&[version]);
            let mut client_cfg = (*client_cfg).clone();
            client_cfg.max_fragment_size = frag;
            client_cfg.enable_sni = sni;
            // The server offers no ALPN, so the client's list is ignored: it only makes the
            // ClientHello long.
            client_cfg.alpn_protocols = (0..40).map(|i| format!("mqtt-protocol-{i:02}").into_bytes()).collect();
            let (a, b) = tokio::io::duplex(1 << 16);
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            // A TLS 1.2 client waits for the server's Finished, which leaves on the first write
            // or flush.
            let server = async {
                let mut s = TlsServerStream::accept(server_cfg, a, None).await?;
                s.flush().await?;
                io::Result::Ok(s)
            };
            let (s, c) = tokio::join!(server, connector.connect(name, b));
            let (s, _c) = (s.unwrap(), c.unwrap());
            let want = sni.then_some("localhost");
            assert_eq!(s.server_name(), want, "max_fragment_size {frag:?}, {version:?}");
        }
    }

    /// Sends `input` as a client would and returns the handshake's error and what the server
    /// answered before closing.
    async fn refused(input: &[u8], chunk: usize) -> (io::Error, Vec<u8>) {
        let (server_cfg, _) = configs();
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let input = input.to_vec();
        let client = tokio::spawn(async move {
            for part in input.chunks(chunk) {
                if b.write_all(part).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let mut got = Vec::new();
            let _ = b.read_to_end(&mut got).await;
            got
        });
        let e = match TlsServerStream::accept(server_cfg, a, None).await {
            Ok(_) => panic!("handshake accepted"),
            Err(e) => e,
        };
        (e, client.await.unwrap())
    }

    /// Handshake records rustls refuses while it still holds handshake messages it has not
    /// looked at (sixteen empty HelloRequests in one record): an error with its alert, never a
    /// panic, whether the record arrives whole or a byte at a time.
    #[tokio::test]
    async fn a_record_of_zeros_is_refused_with_an_alert() {
        let mut zeros = vec![0x16, 0x03, 0x01, 0x00, 0x40];
        zeros.extend([0u8; 64]);
        let mut two = zeros.clone();
        two.extend_from_slice(&zeros);
        let mut hello_then_zeros = vec![0x16, 0x03, 0x01, 0x00, 0x08, 0x01, 0x00, 0x00, 0x04, 0x03, 0x03, 0x00, 0x00];
        hello_then_zeros.extend_from_slice(&zeros);
        for input in [&zeros[..], &two[..], &hello_then_zeros[..]] {
            for chunk in [input.len(), 5, 1] {
                let (e, answer) = refused(input, chunk).await;
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                // An alert record: content type 21, two-byte fatal alert.
                assert_eq!(answer.first(), Some(&0x15), "chunk {chunk}: {e}: answer {answer:02x?}");
                assert_eq!(answer.len(), 7, "{answer:02x?}");
            }
        }
    }

    /// In setup, an incomplete record's bytes are charged to the budget before they are
    /// kept: one that does not fit fails the read with [`OverBudget`], and every charge is
    /// given back when the stream ends or its setup does.
    #[tokio::test]
    async fn incomplete_records_are_charged_within_the_budget() {
        use crate::proxy::budget::SetupBudget;
        let (server_cfg, client_cfg) = configs();
        let budget = SetupBudget::new(prometheus::IntGauge::new("setup_bytes", "test").unwrap());
        // Half of it (what buffers past SMALL may use) holds one such record, not two.
        let max = 48 * 1024;
        let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00];
        record.resize(5 + 16 * 1024, 0);
        let held = |budget: &SetupBudget| {
            let b = budget.clone();
            async move {
                for _ in 0..1000 {
                    if b.used() > 0 {
                        return b.used();
                    }
                    tokio::task::yield_now().await;
                }
                b.used()
            }
        };
        let (a, mut first) = tokio::io::duplex(1 << 16);
        first.write_all(&record[..record.len() - 1]).await.unwrap();
        let cfg = server_cfg.clone();
        let setup = Some((budget.charge(), max));
        let held_open = tokio::spawn(async move { TlsServerStream::accept(cfg, a, setup).await.map(|_| ()) });
        assert!(held(&budget).await >= record.len() - 1);

        let (a, mut second) = tokio::io::duplex(1 << 16);
        second.write_all(&record[..record.len() - 1]).await.unwrap();
        let before = budget.used();
        let e = TlsServerStream::accept(server_cfg.clone(), a, Some((budget.charge(), max))).await.err();
        assert!(e.as_ref().is_some_and(OverBudget::is), "{e:?}");
        assert_eq!(budget.used(), before, "a refused charge takes nothing");

        drop(first);
        assert!(held_open.await.unwrap().is_err());
        assert_eq!(budget.used(), 0, "given back when the stream ends");

        // A real handshake fits; its charge goes with its setup.
        let (a, b) = tokio::io::duplex(1 << 16);
        let connector = tokio_rustls::TlsConnector::from(client_cfg);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (s, c) = tokio::join!(
            TlsServerStream::accept(server_cfg, a, Some((budget.charge(), max))),
            connector.connect(name, b)
        );
        let (mut s, _c) = (s.unwrap(), c.unwrap());
        assert!(s.setup.is_some());
        assert_eq!(budget.used(), 0, "nothing buffered between records");
        s.end_setup();
        assert!(s.setup.is_none());
    }

    #[tokio::test]
    async fn tcp_eof_without_close_notify_is_unexpected_eof() {
        let (mut s, c) = pair(false).await;
        let (io, _) = c.into_inner();
        drop(io);
        let mut buf = [0u8; 16];
        let e = s.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_refused_handshake_sends_its_alert() {
        let (server_cfg, client_cfg) = configs();
        let mut server_cfg = (*server_cfg).clone();
        server_cfg.alpn_protocols = vec![b"mqtt".to_vec()];
        let mut client_cfg = (*client_cfg).clone();
        client_cfg.alpn_protocols = vec![b"other".to_vec()];
        let (a, b) = tokio::io::duplex(1 << 16);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (s, c) = tokio::join!(TlsServerStream::accept(Arc::new(server_cfg), a, None), connector.connect(name, b));
        assert!(s.is_err());
        let e = c.expect_err("client handshake fails");
        assert!(e.to_string().contains("NoApplicationProtocol"), "{e}");
    }

    #[tokio::test]
    async fn handshake_failure_is_an_error() {
        let (server_cfg, _) = configs();
        let (a, mut b) = tokio::io::duplex(4096);
        b.write_all(b"not a TLS client hello at all....").await.unwrap();
        let r = TlsServerStream::accept(server_cfg, a, None).await;
        assert!(r.is_err());
    }
}
