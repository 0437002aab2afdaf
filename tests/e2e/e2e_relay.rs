//! Byte relay after the CONNECT: 10 MB each way and half-close forwarding in both directions,
//! over a plain and a TLS listener. The backend is a test-owned TCP server (harbormaster
//! relays bytes; a byte sink/source is the right peer here, not a broker).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;

use crate::support::mqtt::{self, MqttVersion};
use crate::support::tls::{self, ClientTlsChoice};
use crate::support::*;

const TEN_MB: usize = 10 * 1024 * 1024;
/// 3.1.1 CONNACK "accepted": harbormaster relays once the broker has answered the CONNECT.
const CONNACK: [u8; 4] = [0x20, 2, 0, 0];

/// What the client must receive when the backend answers `CONNACK` and then `download`.
fn after_connack(download: &[u8]) -> Vec<u8> {
    let mut v = CONNACK.to_vec();
    v.extend_from_slice(download);
    v
}

/// Which side half-closes first.
#[derive(Clone, Copy, Debug)]
enum Order {
    /// client sends CONNECT + 10 MB, shuts down its write side; the backend answers the
    /// CONNECT with a CONNACK, reads to EOF, then sends 10 MB and closes.
    ClientFirst,
    /// the backend reads the CONNECT, sends 10 MB and shuts down its write side while the
    /// client is still sending; the client reads to EOF, then sends 10 MB and shuts down.
    BackendFirst,
}

/// A one-connection backend. Returns its port and a receiver for its verdict.
fn backend(
    order: Order,
    connect: Vec<u8>,
    upload: Vec<u8>,
    download: Vec<u8>,
) -> (u16, mpsc::Receiver<Result<(), String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let result = (|| -> Result<(), String> {
            let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(CMD_TIMEOUT)).unwrap();
            s.set_write_timeout(Some(CMD_TIMEOUT)).unwrap();
            let mut first = vec![0u8; connect.len()];
            s.read_exact(&mut first).map_err(|e| format!("reading the CONNECT: {e}"))?;
            if first != connect {
                return Err(format!(
                    "the backend's first bytes are not the client's CONNECT: {} vs {}",
                    hex(&first),
                    hex(&connect)
                ));
            }
            match order {
                Order::ClientFirst => {
                    s.write_all(&CONNACK).map_err(|e| format!("writing the CONNACK: {e}"))?;
                    read_and_check(&mut s, &upload, "client→backend")?;
                    s.write_all(&download).map_err(|e| format!("writing after the client's half-close: {e}"))?;
                    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
                }
                Order::BackendFirst => {
                    s.write_all(&download).map_err(|e| e.to_string())?;
                    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
                    read_and_check(&mut s, &upload, "client→backend after backend half-close")?;
                }
            }
            Ok(())
        })();
        let _ = tx.send(result);
    });
    (port, rx)
}

/// Reads to EOF and compares length and SHA-256 with `want`.
fn read_and_check(s: &mut impl Read, want: &[u8], what: &str) -> Result<(), String> {
    let mut got = Vec::with_capacity(want.len());
    s.read_to_end(&mut got).map_err(|e| format!("{what}: reading to EOF after {} bytes: {e}", got.len()))?;
    if got.len() != want.len() || sha256_hex(&got) != sha256_hex(want) {
        return Err(format!(
            "{what}: got {} bytes (sha256 {}), want {} bytes (sha256 {})",
            got.len(),
            sha256_hex(&got),
            want.len(),
            sha256_hex(want)
        ));
    }
    Ok(())
}

fn harbormaster_for(backend_port: u16, certs: &Certs) -> (Harbormaster, u16, u16) {
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "plain"
bind = "127.0.0.1:0"
pool = "sink"

[[listener]]
name = "tls"
bind = "127.0.0.1:0"
pool = "sink"
{tls}
[pool.sink]
backends = ["127.0.0.1:{backend_port}"]
proxy_protocol = "none"
"#,
        tls = certs.listener_tls_toml("optional")
    ));
    let (plain, tls_port) = (hm.port("plain"), hm.port("tls"));
    (hm, plain, tls_port)
}

struct Payloads {
    connect: Vec<u8>,
    upload: Vec<u8>,
    download: Vec<u8>,
}

fn payloads(id: &str, seed: u64) -> Payloads {
    Payloads {
        connect: mqtt::connect(MqttVersion::V311, id),
        upload: pseudo_random_bytes(TEN_MB, seed),
        download: pseudo_random_bytes(TEN_MB, seed ^ 0x5555_aaaa),
    }
}

fn verdict(rx: mpsc::Receiver<Result<(), String>>) {
    match rx.recv_timeout(CMD_TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("backend: {e}"),
        Err(e) => panic!("backend gave no verdict: {e}"),
    }
}

#[test]
fn plain_10mb_each_way_client_half_closes_first() {
    let p = payloads("relay-plain-1", 1);
    let (bport, rx) = backend(Order::ClientFirst, p.connect.clone(), p.upload.clone(), p.download.clone());
    let certs = Certs::new();
    let (hm, plain, _) = harbormaster_for(bport, &certs);
    let mut c = TcpStream::connect(("127.0.0.1", plain)).unwrap();
    c.set_read_timeout(Some(CMD_TIMEOUT)).unwrap();
    c.write_all(&p.connect).unwrap();
    c.write_all(&p.upload).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    read_and_check(&mut c, &after_connack(&p.download), "backend→client after client half-close")
        .unwrap_or_else(|e| panic!("{e}"));
    verdict(rx);
    let log =
        hm.wait_connection_log("client_id", "relay-plain-1").unwrap_or_else(|| panic!("no log line:\n{}", hm.log()));
    let bytes_in: u64 = log["bytes_in"].parse().unwrap_or(0);
    let bytes_out: u64 = log["bytes_out"].parse().unwrap_or(0);
    assert!(bytes_in >= TEN_MB as u64, "{log:?}");
    assert!(bytes_out >= TEN_MB as u64, "{log:?}");
}

#[test]
fn plain_10mb_each_way_backend_half_closes_first() {
    let p = payloads("relay-plain-2", 2);
    let (bport, rx) = backend(Order::BackendFirst, p.connect.clone(), p.upload.clone(), p.download.clone());
    let certs = Certs::new();
    let (_hm, plain, _) = harbormaster_for(bport, &certs);
    let mut c = TcpStream::connect(("127.0.0.1", plain)).unwrap();
    c.set_read_timeout(Some(CMD_TIMEOUT)).unwrap();
    c.write_all(&p.connect).unwrap();
    read_and_check(&mut c, &p.download, "backend→client before client half-close").unwrap_or_else(|e| panic!("{e}"));
    c.write_all(&p.upload).expect("writing after the backend's half-close");
    c.shutdown(Shutdown::Write).unwrap();
    verdict(rx);
    // after both halves closed, harbormaster closes the client connection
    let (rest, closed) = mqtt::read_until_close(&mut c, WAIT);
    assert!(rest.is_empty() && closed, "{} more bytes", rest.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_10mb_each_way_client_half_closes_first() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = payloads("relay-tls-1", 3);
    let (bport, rx) = backend(Order::ClientFirst, p.connect.clone(), p.upload.clone(), p.download.clone());
    let certs = Certs::new();
    let (hm, _, tls_port) = tokio::task::block_in_place(|| harbormaster_for(bport, &certs));
    let cfg = tls::client_config(&certs, true, ClientTlsChoice::Default);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    let mut t = tls::tokio_connector(cfg).connect(tls::server_name("localhost"), tcp).await.expect("TLS handshake");
    let io = async {
        t.write_all(&p.connect).await?;
        t.write_all(&p.upload).await?;
        // close_notify + TCP FIN: the TLS half-close
        t.shutdown().await?;
        let mut got = Vec::with_capacity(TEN_MB);
        let r = t.read_to_end(&mut got).await;
        Ok::<_, std::io::Error>((got, r))
    };
    let (got, r) = tokio::time::timeout(CMD_TIMEOUT, io).await.expect("TLS relay timed out").expect("TLS I/O");
    let want = after_connack(&p.download);
    assert_eq!(got.len(), want.len(), "bytes received over TLS ({r:?})");
    assert_eq!(sha256_hex(&got), sha256_hex(&want));
    // harbormaster ends the TLS stream with close_notify, not a bare FIN
    r.expect("TLS stream ended without close_notify");
    tokio::task::block_in_place(|| {
        verdict(rx);
        let log =
            hm.wait_connection_log("client_id", "relay-tls-1").unwrap_or_else(|| panic!("no log line:\n{}", hm.log()));
        assert_eq!(log.get("listener").map(String::as_str), Some("tls"), "{log:?}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_10mb_each_way_backend_half_closes_first() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = payloads("relay-tls-2", 4);
    let (bport, rx) = backend(Order::BackendFirst, p.connect.clone(), p.upload.clone(), p.download.clone());
    let certs = Certs::new();
    let (_hm, _, tls_port) = tokio::task::block_in_place(|| harbormaster_for(bport, &certs));
    let cfg = tls::client_config(&certs, false, ClientTlsChoice::Default);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    let mut t = tls::tokio_connector(cfg).connect(tls::server_name("localhost"), tcp).await.expect("TLS handshake");
    let io = async {
        t.write_all(&p.connect).await?;
        t.flush().await?;
        let mut got = Vec::with_capacity(TEN_MB);
        let r = t.read_to_end(&mut got).await;
        // the backend half-closed; our direction must still be open
        t.write_all(&p.upload).await?;
        t.shutdown().await?;
        Ok::<_, std::io::Error>((got, r))
    };
    let (got, r) = tokio::time::timeout(CMD_TIMEOUT, io).await.expect("TLS relay timed out").expect("TLS I/O");
    assert_eq!(got.len(), p.download.len(), "bytes received over TLS ({r:?})");
    assert_eq!(sha256_hex(&got), sha256_hex(&p.download));
    r.expect("TLS half-close from the backend did not arrive as close_notify");
    tokio::task::block_in_place(|| verdict(rx));
}
