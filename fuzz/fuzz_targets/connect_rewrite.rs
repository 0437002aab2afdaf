//! The CONNECT rewrite on every CONNECT the parser accepts: never panics; a rewrite is one
//! whole CONNECT again, with the same version, client-id and keep-alive and the username the
//! template makes; rewriting it again changes nothing (the harbormaster- User Properties are
//! replaced, not added twice); only a CONNECT whose 5.0 properties are not well formed is
//! refused. The client-id harbormaster assigns (`empty_client_id = "assign"`) set in the
//! rewrite gives a CONNECT with that id and nothing else changed. And the same bytes read as a
//! broker's first packet: adding the assigned id to a CONNACK never panics, and what it makes
//! is one whole CONNACK that already names an id.
//!
//! The limit (the brokers' Maximum Packet Size or max_connect_packet) is an input too: one,
//! zero or one byte fewer than the rewrite's size, as the data's second-to-last byte (for
//! the assigned client-id: its length) picks.
//! At or above the size the rewrite is the same; below it, refused with both sizes named.

// The two pure modules, not the crate: the instrumented build takes seconds.
#[allow(dead_code)]
#[path = "../../src/proxy/mqtt.rs"]
mod mqtt;
#[allow(dead_code)]
#[path = "../../src/proxy/rewrite.rs"]
mod rewrite;

use rewrite::{Fact, Facts, Policy, RewriteError, Template};

fn main() {
    let facts = Facts {
        cert_cn: Some("device-0042"),
        cert_issuer_cn: Some("Fleet CA"),
        cert_sha256: Some(&[0x5a; 32]),
        sni: Some("mqtt.example.com"),
        alpn: Some(b"mqtt"),
        tls_version: Some("TLSv1.3"),
        client_address: "203.0.113.7:49228".parse().unwrap(),
        client_id: b"",
        username: None,
    };
    // Each policy with the username it makes (`None`: the client's own).
    let policies: [(Policy, Option<&[u8]>); 3] = [
        (
            Policy {
                username: Some(Template::parse("{cert_cn}@{sni}").unwrap()),
                drop_password: true,
                user_properties: vec![Fact::ClientAddress, Fact::CertSha256, Fact::Sni],
            },
            Some(b"device-0042@mqtt.example.com"),
        ),
        (
            Policy { username: Some(Template::parse("cert_cn").unwrap()), drop_password: false, user_properties: vec![] },
            Some(b"device-0042"),
        ),
        (Policy { username: None, drop_password: true, user_properties: vec![Fact::Alpn] }, None),
    ];
    const ID: &[u8] = b"hm-abcdefghijklmnopqrstuvwxyz";
    afl::fuzz!(|data: &[u8]| {
        if let Ok(Some(out)) = rewrite::assign_in_connack(data, ID, 1 << 20) {
            assert_eq!(mqtt::announced_len(&out), Some(out.len()), "one whole packet");
            assert_eq!(out.first(), Some(&0x20));
            assert_eq!(rewrite::assign_in_connack(&out, ID, 1 << 20), Ok(None), "the id is there");
        }
        let Ok(mqtt::Peek::Complete { len, connect }) = mqtt::peek_connect(data, 1 << 16) else {
            return;
        };
        let packet = &data[..len];
        let (policy, username) = &policies[usize::from(data.last().copied().unwrap_or(0)) % policies.len()];
        let out = match rewrite::rewrite(packet, connect.version, policy, &facts, 1 << 20) {
            Ok(Some(out)) => out.packet,
            Ok(None) => return,
            Err(RewriteError::Malformed(_)) => {
                assert_eq!(connect.version, mqtt::MqttVersion::V5, "only 5.0 properties go unchecked by the parser");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let Ok(mqtt::Peek::Complete { len: new_len, connect: new }) = mqtt::peek_connect(&out, 1 << 20) else {
            panic!("the rewrite is not a CONNECT");
        };
        assert_eq!(new_len, out.len());
        assert_eq!((new.version, new.client_id, new.keep_alive), (connect.version, connect.client_id, connect.keep_alive));
        assert_eq!(new.username, username.or(connect.username));
        // out.len() - 1, out.len() or out.len() + 1.
        let limit = out.len() + usize::from(data.iter().rev().nth(1).copied().unwrap_or(0) % 3) - 1;
        let limited = rewrite::rewrite(packet, connect.version, policy, &facts, limit);
        if limit >= out.len() {
            assert_eq!(limited.unwrap().unwrap().packet, out, "a limit the rewrite fits changes nothing");
        } else {
            assert_eq!(limited, Err(RewriteError::TooLarge { len: out.len(), max: limit }));
        }
        let again = rewrite::rewrite(&out, new.version, policy, &facts, 1 << 20).unwrap().unwrap();
        assert_eq!(again.packet, out, "a second rewrite changes nothing");
        let assigned = rewrite::set_client_id(&out, new.version, ID, 1 << 20).unwrap();
        let Ok(mqtt::Peek::Complete { len: a_len, connect: a }) = mqtt::peek_connect(&assigned, 1 << 20) else {
            panic!("the CONNECT with the assigned id is not a CONNECT");
        };
        assert_eq!(a_len, assigned.len());
        let limit = assigned.len() + data.len() % 3 - 1;
        match rewrite::set_client_id(&out, new.version, ID, limit) {
            Ok(p) => assert!(limit >= assigned.len() && p == assigned, "{limit}"),
            Err(e) => assert!(
                limit < assigned.len() && e == RewriteError::TooLarge { len: assigned.len(), max: limit },
                "{limit}: {e}"
            ),
        }
        assert_eq!((a.version, a.client_id, a.username, a.keep_alive), (new.version, ID, new.username, new.keep_alive));
    });
}
