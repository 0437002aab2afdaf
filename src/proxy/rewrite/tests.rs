//! The rewrite checked against two independent MQTT codecs: CONNECTs encoded by `mqtt-proto`,
//! rewritten, then decoded by `mqtt-proto` and `mqttbytes` and compared with what the policy
//! asks for; the bytes compared with `mqtt-proto`'s own encoding of the expected CONNECT.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::proxy::mqtt::{peek_connect, Peek};

const SHA: [u8; 32] = [0xab; 32];

fn facts<'a>(cn: Option<&'a str>) -> Facts<'a> {
    Facts {
        cert_cn: cn,
        cert_issuer_cn: Some("Fleet CA"),
        cert_sha256: cn.map(|_| &SHA),
        sni: Some("mqtt.example.com"),
        alpn: None,
        tls_version: Some("TLSv1.3"),
        client_address: "203.0.113.7:49228".parse().unwrap(),
        client_id: b"truck-42",
        username: Some(b"orig"),
    }
}

fn policy(username: Option<&str>, drop_password: bool, props: &[Fact]) -> Policy {
    Policy { username: username.map(|u| Template::parse(u).unwrap()), drop_password, user_properties: props.to_vec() }
}

fn v3(
    protocol: mqtt_proto::Protocol,
    username: Option<&str>,
    password: Option<&[u8]>,
    will: bool,
) -> mqtt_proto::v3::Connect {
    mqtt_proto::v3::Connect {
        protocol,
        clean_session: true,
        keep_alive: 60,
        client_id: Arc::from("truck-42"),
        last_will: will.then(|| mqtt_proto::v3::LastWill {
            qos: mqtt_proto::QoS::Level1,
            retain: true,
            topic_name: mqtt_proto::TopicName::try_from("status/truck-42").unwrap(),
            message: b"gone".to_vec().into(),
        }),
        username: username.map(Arc::from),
        password: password.map(|p| p.to_vec().into()),
    }
}

fn encode_v3(c: &mqtt_proto::v3::Connect) -> Vec<u8> {
    mqtt_proto::v3::Packet::Connect(c.clone()).encode().unwrap().as_ref().to_vec()
}

fn encode_v5(c: &mqtt_proto::v5::Connect) -> Vec<u8> {
    mqtt_proto::v5::Packet::Connect(c.clone()).encode().unwrap().as_ref().to_vec()
}

fn decode_v3(bytes: &[u8]) -> mqtt_proto::v3::Connect {
    match mqtt_proto::v3::Packet::decode(bytes).unwrap().unwrap() {
        mqtt_proto::v3::Packet::Connect(c) => c,
        other => panic!("{other:?}"),
    }
}

fn decode_v5(bytes: &[u8]) -> mqtt_proto::v5::Connect {
    match mqtt_proto::v5::Packet::decode(bytes).unwrap().unwrap() {
        mqtt_proto::v5::Packet::Connect(c) => c,
        other => panic!("{other:?}"),
    }
}

fn mqttbytes_v4(bytes: &[u8]) -> mqttbytes::v4::Connect {
    let mut b = bytes::BytesMut::from(bytes);
    match mqttbytes::v4::read(&mut b, 1 << 20).unwrap() {
        mqttbytes::v4::Packet::Connect(c) => c,
        other => panic!("{other:?}"),
    }
}

fn mqttbytes_v5(bytes: &[u8]) -> mqttbytes::v5::Connect {
    let mut b = bytes::BytesMut::from(bytes);
    match mqttbytes::v5::read(&mut b, 1 << 20).unwrap() {
        mqttbytes::v5::Packet::Connect(c) => c,
        other => panic!("{other:?}"),
    }
}

fn run(packet: &[u8], version: MqttVersion, p: &Policy, f: &Facts<'_>) -> Rewritten {
    let out = rewrite(packet, version, p, f, 1 << 20).unwrap().expect("a rewrite");
    // Our own parser takes the result as one whole CONNECT.
    match peek_connect(&out.packet, 1 << 20).unwrap() {
        Peek::Complete { len, .. } => assert_eq!(len, out.packet.len()),
        Peek::Incomplete => panic!("incomplete"),
    }
    out
}

#[test]
fn cert_cn_becomes_the_username_of_a_311_connect() {
    let orig = v3(mqtt_proto::Protocol::V311, None, None, true);
    let out = run(&encode_v3(&orig), MqttVersion::V311, &policy(Some("cert_cn"), false, &[]), &facts(Some("device-7")));
    let expected = mqtt_proto::v3::Connect { username: Some(Arc::from("device-7")), ..orig };
    assert_eq!(out.packet, encode_v3(&expected), "byte for byte what mqtt-proto encodes");
    assert_eq!(decode_v3(&out.packet), expected);
    let mb = mqttbytes_v4(&out.packet);
    assert_eq!(mb.login.unwrap().username, "device-7");
    assert_eq!(mb.client_id, "truck-42");
    assert_eq!(mb.last_will.unwrap().message.as_ref(), b"gone");
    assert_eq!(out.summary, r#"username="device-7" ({cert_cn})"#);
}

#[test]
fn a_template_replaces_the_username_and_the_password_is_dropped() {
    for protocol in [mqtt_proto::Protocol::V310, mqtt_proto::Protocol::V311] {
        let version = if protocol == mqtt_proto::Protocol::V310 { MqttVersion::V31 } else { MqttVersion::V311 };
        let orig = v3(protocol, Some("orig"), Some(b"secret"), true);
        let p = policy(Some("{cert_cn}@{sni}"), true, &[Fact::Sni]);
        let out = run(&encode_v3(&orig), version, &p, &facts(Some("device-7")));
        let expected =
            mqtt_proto::v3::Connect { username: Some(Arc::from("device-7@mqtt.example.com")), password: None, ..orig };
        assert_eq!(out.packet, encode_v3(&expected));
        assert_eq!(decode_v3(&out.packet), expected);
        assert!(!out.summary.contains("secret"), "{}", out.summary);
        assert_eq!(out.summary, r#"username="device-7@mqtt.example.com" ({cert_cn}@{sni}), password dropped"#);
    }
}

#[test]
fn user_properties_are_added_and_forged_ones_removed_in_mqtt5() {
    let user = |n: &str, v: &str| mqtt_proto::v5::UserProperty { name: Arc::from(n), value: Arc::from(v) };
    let orig = mqtt_proto::v5::Connect {
        protocol: mqtt_proto::Protocol::V500,
        clean_start: true,
        keep_alive: 30,
        properties: mqtt_proto::v5::ConnectProperties {
            session_expiry_interval: Some(3600),
            receive_max: Some(20),
            user_properties: vec![user("k", "v"), user("harbormaster-sni", "forged"), user("harbormaster-x", "y")],
            ..Default::default()
        },
        client_id: Arc::from("truck-42"),
        last_will: None,
        username: Some(Arc::from("orig")),
        password: Some(b"secret".to_vec().into()),
    };
    let p = policy(Some("cert_cn"), false, &[Fact::ClientAddress, Fact::CertSha256, Fact::Sni]);
    let out = run(&encode_v5(&orig), MqttVersion::V5, &p, &facts(Some("device-7")));
    let mut expected = orig.clone();
    expected.username = Some(Arc::from("device-7"));
    expected.properties.user_properties = vec![
        user("k", "v"),
        user("harbormaster-client_address", "203.0.113.7:49228"),
        user("harbormaster-cert_sha256", &"ab".repeat(32)),
        user("harbormaster-sni", "mqtt.example.com"),
    ];
    assert_eq!(out.packet, encode_v5(&expected));
    assert_eq!(decode_v5(&out.packet), expected);
    let mb = mqttbytes_v5(&out.packet);
    let props = mb.properties.unwrap();
    assert_eq!(props.session_expiry_interval, Some(3600));
    assert_eq!(props.user_properties.len(), 4);
    assert_eq!(props.user_properties[3], ("harbormaster-sni".to_string(), "mqtt.example.com".to_string()));
    let login = mb.login.unwrap();
    assert_eq!((login.username.as_str(), login.password.as_str()), ("device-7", "secret"));

    // A fact the connection lacks is left out, not sent empty.
    let out =
        run(&encode_v5(&orig), MqttVersion::V5, &policy(None, false, &[Fact::CertSha256, Fact::Sni]), &facts(None));
    let names: Vec<String> =
        decode_v5(&out.packet).properties.user_properties.iter().map(|u| u.name.to_string()).collect();
    assert_eq!(names, ["k", "harbormaster-sni"]);
}

#[test]
fn user_properties_leave_3x_connects_alone() {
    let orig = encode_v3(&v3(mqtt_proto::Protocol::V311, Some("u"), Some(b"p"), false));
    let p = policy(None, false, &[Fact::Sni]);
    assert_eq!(rewrite(&orig, MqttVersion::V311, &p, &facts(None), 1 << 20).unwrap(), None);
}

#[test]
fn refusals_missing_cn_bad_username_too_large() {
    let orig = encode_v3(&v3(mqtt_proto::Protocol::V311, None, None, false));
    let p = policy(Some("cert_cn"), false, &[]);
    assert_eq!(rewrite(&orig, MqttVersion::V311, &p, &facts(None), 1 << 20), Err(RewriteError::Missing(Fact::CertCn)));
    let long = "x".repeat(70_000);
    let p = policy(Some(&long), false, &[]);
    assert_eq!(
        rewrite(&orig, MqttVersion::V311, &p, &facts(None), 1 << 20),
        Err(RewriteError::BadUsername("is longer than 65535 bytes"))
    );
    let p = policy(Some("{cert_cn}-with-a-long-suffix"), false, &[]);
    let len = orig.len() + 2 + "device-7-with-a-long-suffix".len();
    assert_eq!(
        rewrite(&orig, MqttVersion::V311, &p, &facts(Some("device-7")), orig.len() + 4),
        Err(RewriteError::TooLarge { len, max: orig.len() + 4 })
    );
}

/// The limit (the brokers' Maximum Packet Size, or max_connect_packet) bounds the whole
/// rewritten packet, fixed header included: a result of exactly the limit passes, one byte
/// more is refused with both sizes named; the client's CONNECT itself may be at the limit.
#[test]
fn the_limit_is_the_whole_rewritten_packet_exactly_at_it_passes_one_over_is_refused() {
    let user = |n: &str, v: &str| mqtt_proto::v5::UserProperty { name: Arc::from(n), value: Arc::from(v) };
    let mut v5 = mqtt_proto::v5::Connect::new(Arc::from("truck-42"), 30);
    v5.properties.user_properties = vec![user("k", "v")];
    let cases = [
        (encode_v3(&v3(mqtt_proto::Protocol::V311, None, None, false)), MqttVersion::V311),
        (encode_v3(&v3(mqtt_proto::Protocol::V310, Some("u"), Some(b"p"), true)), MqttVersion::V31),
        (encode_v5(&v5), MqttVersion::V5),
    ];
    let p = policy(Some("{cert_cn}@{sni}"), false, &[Fact::ClientAddress, Fact::Sni]);
    let f = facts(Some("device-7"));
    for (orig, version) in cases {
        let exact = run(&orig, version, &p, &f).packet;
        assert!(exact.len() > orig.len(), "{version:?}: the rewrite grows the CONNECT");
        assert_eq!(rewrite(&orig, version, &p, &f, exact.len()).unwrap().unwrap().packet, exact, "{version:?}");
        assert_eq!(
            rewrite(&orig, version, &p, &f, exact.len() - 1),
            Err(RewriteError::TooLarge { len: exact.len(), max: exact.len() - 1 }),
            "{version:?}"
        );
        // The assigned client-id, on the rewritten CONNECT: the same boundary.
        let assigned = set_client_id(&exact, version, ID.as_bytes(), 1 << 20).unwrap();
        assert_eq!(set_client_id(&exact, version, ID.as_bytes(), assigned.len()).unwrap(), assigned);
        assert_eq!(
            set_client_id(&exact, version, ID.as_bytes(), assigned.len() - 1),
            Err(RewriteError::TooLarge { len: assigned.len(), max: assigned.len() - 1 })
        );
    }
    // Across the remaining length's first extra byte (127 -> 128): the fixed header grows by
    // one, and the limit counts it.
    let mut grown = None;
    for pad in 0..200 {
        let id = format!("truck-{}", "x".repeat(pad));
        let c = mqtt_proto::v3::Connect {
            client_id: Arc::from(id.as_str()),
            ..v3(mqtt_proto::Protocol::V311, None, None, false)
        };
        let orig = encode_v3(&c);
        let out = run(&orig, MqttVersion::V311, &p, &f).packet;
        if orig[1] < 0x80 && out[1] & 0x80 != 0 {
            grown = Some((orig, out));
            break;
        }
    }
    let (orig, out) = grown.expect("a CONNECT whose rewrite needs a two-byte remaining length");
    assert_eq!(out.len(), 3 + usize::from(out[1] & 0x7f) + 128 * usize::from(out[2]), "a 3-byte fixed header");
    assert!(rewrite(&orig, MqttVersion::V311, &p, &f, out.len()).is_ok());
    assert_eq!(
        rewrite(&orig, MqttVersion::V311, &p, &f, out.len() - 1),
        Err(RewriteError::TooLarge { len: out.len(), max: out.len() - 1 })
    );
}

/// What Mosquitto 2.0 closes the connection on without a CONNACK (a username or a User
/// Property holding U+0000, a C0 or C1 control, DEL or a non-character) is never sent: the
/// CONNECT is refused here, before any broker is dialled. U+2028, which it takes, passes.
#[test]
fn strings_brokers_refuse_are_refused_before_any_broker_sees_them() {
    for (text, want) in [
        ("device-7", None),
        ("Gerät \u{2028} ✓", None),
        ("a\0b", Some("contains U+0000")),
        ("a\u{1}b", Some("holds a control character")),
        ("a\u{1f}b", Some("holds a control character")),
        ("a\u{7f}b", Some("holds a control character")),
        ("a\u{85}b", Some("holds a control character")),
        ("a\u{fffe}b", Some("holds a Unicode non-character")),
        ("a\u{fdd0}b", Some("holds a Unicode non-character")),
        ("a\u{10ffff}b", Some("holds a Unicode non-character")),
    ] {
        assert_eq!(string_problem(text), want, "{text:?}");
    }
    let orig5 = encode_v5(&mqtt_proto::v5::Connect::new(Arc::from("truck-42"), 30));
    // The username made of a fact that holds one.
    let mut f = facts(Some("dev\u{fffe}"));
    assert_eq!(
        rewrite(&orig5, MqttVersion::V5, &policy(Some("cert_cn"), false, &[]), &f, 1 << 20),
        Err(RewriteError::BadUsername("holds a Unicode non-character"))
    );
    f.client_id = b"truck\x01";
    assert_eq!(
        rewrite(&orig5, MqttVersion::V5, &policy(Some("id:{client_id}"), false, &[]), &f, 1 << 20),
        Err(RewriteError::BadUsername("holds a control character"))
    );
    // A User Property's value: the same, and not UTF-8 at all (an ALPN is any bytes).
    let err = rewrite(&orig5, MqttVersion::V5, &policy(None, false, &[Fact::Sni, Fact::ClientId]), &f, 1 << 20);
    assert_eq!(err, Err(RewriteError::BadProperty(Fact::ClientId, "holds a control character")));
    assert_eq!(err.unwrap_err().to_string(), "the User Property harbormaster-client_id holds a control character");
    f.alpn = Some(b"\xff\xfe");
    assert_eq!(
        rewrite(&orig5, MqttVersion::V5, &policy(None, false, &[Fact::Alpn]), &f, 1 << 20),
        Err(RewriteError::BadProperty(Fact::Alpn, "is not UTF-8"))
    );
    // A template's own text: refused when it is parsed (check).
    for bad in ["dev\u{1}{cert_cn}", "{cert_cn}\u{fffe}", "a\0b"] {
        let e = Template::parse(bad).unwrap_err();
        assert!(e.contains("which brokers refuse in a username"), "{bad:?}: {e}");
    }
}

#[test]
fn templates_parse_or_say_why_not() {
    assert_eq!(Template::parse("cert_cn").unwrap().describe(), "{cert_cn}");
    let t = Template::parse("dev:{cert_cn}@{sni}").unwrap();
    assert_eq!(
        t.0,
        [Piece::Text("dev:".into()), Piece::Fact(Fact::CertCn), Piece::Text("@".into()), Piece::Fact(Fact::Sni)]
    );
    assert_eq!(t.describe(), "dev:{cert_cn}@{sni}");
    assert!(Template::parse("").unwrap_err().contains("empty"));
    assert!(Template::parse("{nope}").unwrap_err().contains("unknown placeholder {nope}"));
    assert!(Template::parse("{cert_cn").unwrap_err().contains("without its"));
    assert!(Template::parse("a}b").unwrap_err().contains("without its"));
}

fn text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::char::range(' ', '\u{3ff}'), 0..=max).prop_map(|chars| chars.into_iter().collect())
}

proptest! {
    /// Whatever the CONNECT, the rewrite is mqtt-proto's encoding of the CONNECT the policy
    /// asks for, and a policy with nothing to change gives the bytes back unchanged.
    #[test]
    fn rewrite_is_the_reference_encoding_of_the_expected_connect(
        client_id in text(20),
        keep_alive in any::<u16>(),
        clean in any::<bool>(),
        expiry in prop::option::of(any::<u32>()),
        users in prop::collection::vec((prop_oneof![text(6), Just("harbormaster-sni".to_string())], text(12)), 0..3),
        will in prop::option::of(("[a-z]{1,8}", prop::collection::vec(any::<u8>(), 0..20))),
        username in prop::option::of(text(12)),
        password in prop::option::of(prop::collection::vec(any::<u8>(), 0..12)),
        cn in "[a-zA-Z0-9 .-]{1,20}",
        drop_password in any::<bool>(),
    ) {
        let user = |(n, v): &(String, String)| mqtt_proto::v5::UserProperty { name: Arc::from(n.as_str()), value: Arc::from(v.as_str()) };
        let orig = mqtt_proto::v5::Connect {
            protocol: mqtt_proto::Protocol::V500,
            clean_start: clean,
            keep_alive,
            properties: mqtt_proto::v5::ConnectProperties {
                session_expiry_interval: expiry,
                user_properties: users.iter().map(user).collect(),
                ..Default::default()
            },
            client_id: Arc::from(client_id.as_str()),
            last_will: will.map(|(t, m)| mqtt_proto::v5::LastWill {
                qos: mqtt_proto::QoS::Level0,
                retain: false,
                topic_name: mqtt_proto::TopicName::try_from(t.as_str()).unwrap(),
                payload: m.into(),
                properties: Default::default(),
            }),
            username: username.as_deref().map(Arc::from),
            password: password.clone().map(Into::into),
        };
        let bytes = encode_v5(&orig);
        let f = facts(Some(&cn));
        let p = policy(Some("{cert_cn}"), drop_password, &[Fact::Sni]);
        let out = rewrite(&bytes, MqttVersion::V5, &p, &f, 1 << 20).unwrap().unwrap();
        let mut expected = orig.clone();
        expected.username = Some(Arc::from(cn.as_str()));
        if drop_password {
            expected.password = None;
        }
        expected.properties.user_properties.retain(|u| !u.name.starts_with("harbormaster-"));
        expected.properties.user_properties.push(mqtt_proto::v5::UserProperty {
            name: Arc::from("harbormaster-sni"),
            value: Arc::from("mqtt.example.com"),
        });
        prop_assert_eq!(&out.packet, &encode_v5(&expected));
        prop_assert_eq!(decode_v5(&out.packet), expected);
        // mqttbytes 0.6 misreads multi-byte UTF-8 in CONNECT strings and reads the password as
        // text: ASCII ones only.
        let ascii = client_id.is_ascii() && username.as_deref().is_none_or(str::is_ascii)
            && users.iter().all(|(n, v)| n.is_ascii() && v.is_ascii())
            && (drop_password || password.as_deref().is_none_or(<[u8]>::is_ascii));
        if ascii {
            let mb = mqttbytes_v5(&out.packet);
            prop_assert_eq!(mb.client_id, client_id);
            prop_assert_eq!(mb.login.map(|l| l.username), Some(cn.clone()));
        }

        // Dropping a password that is not there changes nothing, byte for byte.
        if password.is_none() {
            let p = policy(None, true, &[]);
            let same = rewrite(&bytes, MqttVersion::V5, &p, &f, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(same.packet, bytes);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// empty_client_id = "assign": the client-id set in the CONNECT, the id added to the CONNACK
// ---------------------------------------------------------------------------------------------

const ID: &str = "hm-abcdefghijklmnopqrstuvwxyz";

fn encode_connack(c: &mqtt_proto::v5::Connack) -> Vec<u8> {
    mqtt_proto::v5::Packet::Connack(c.clone()).encode().unwrap().as_ref().to_vec()
}

fn decode_connack(bytes: &[u8]) -> mqtt_proto::v5::Connack {
    match mqtt_proto::v5::Packet::decode(bytes).unwrap().unwrap() {
        mqtt_proto::v5::Packet::Connack(c) => c,
        other => panic!("{other:?}"),
    }
}

fn mqttbytes_connack(bytes: &[u8]) -> mqttbytes::v5::ConnAck {
    let mut b = bytes::BytesMut::from(bytes);
    match mqttbytes::v5::read(&mut b, 1 << 20).unwrap() {
        mqttbytes::v5::Packet::ConnAck(c) => c,
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_assigned_id_replaces_the_empty_client_id_and_composes_with_a_policy() {
    let mut orig = mqtt_proto::v5::Connect::new(Arc::from(""), 30);
    orig.clean_start = false;
    orig.properties.session_expiry_interval = Some(300);
    orig.username = Some(Arc::from("orig"));
    let bytes = encode_v5(&orig);
    let out = set_client_id(&bytes, MqttVersion::V5, ID.as_bytes(), 1 << 20).unwrap();
    let mut expected = orig.clone();
    expected.client_id = Arc::from(ID);
    assert_eq!(out, encode_v5(&expected));
    assert_eq!(mqttbytes_v5(&out).client_id, ID);
    // After a policy's rewrite, as the first bytes step does: both changes hold.
    let p = policy(Some("{cert_cn}"), false, &[Fact::ClientId]);
    let mut f = facts(Some("device-7"));
    f.client_id = ID.as_bytes();
    let rewritten = run(&bytes, MqttVersion::V5, &p, &f).packet;
    let both = decode_v5(&set_client_id(&rewritten, MqttVersion::V5, ID.as_bytes(), 1 << 20).unwrap());
    assert_eq!(&*both.client_id, ID);
    assert_eq!(both.username.as_deref(), Some("device-7"));
    assert_eq!(&*both.properties.user_properties[0].value, ID);
    // Over the limit: refused.
    let too_large = set_client_id(&bytes, MqttVersion::V5, ID.as_bytes(), bytes.len() + 3).unwrap_err();
    assert!(matches!(too_large, RewriteError::TooLarge { .. }), "{too_large:?}");
}

#[test]
fn the_assigned_id_is_added_to_a_successful_connack_only() {
    let ok = encode_connack(&mqtt_proto::v5::Connack::new(false, mqtt_proto::v5::ConnectReasonCode::Success));
    let out = assign_in_connack(&ok, ID.as_bytes(), 1 << 20).unwrap().unwrap();
    let mut expected = mqtt_proto::v5::Connack::new(false, mqtt_proto::v5::ConnectReasonCode::Success);
    expected.properties.assigned_client_id = Some(Arc::from(ID));
    assert_eq!(out, encode_connack(&expected));
    assert_eq!(mqttbytes_connack(&out).properties.unwrap().assigned_client_identifier.as_deref(), Some(ID));
    // A CONNACK of two bytes (no property length) gets one.
    assert_eq!(assign_in_connack(&[0x20, 0x02, 0x00, 0x00], ID.as_bytes(), 1 << 20).unwrap().unwrap(), out);
    // A refusal, a CONNACK that names an id already, an AUTH: passed on as they are.
    let refused =
        encode_connack(&mqtt_proto::v5::Connack::new(false, mqtt_proto::v5::ConnectReasonCode::NotAuthorized));
    assert_eq!(assign_in_connack(&refused, ID.as_bytes(), 1 << 20), Ok(None));
    let mut named = mqtt_proto::v5::Connack::new(false, mqtt_proto::v5::ConnectReasonCode::Success);
    named.properties.assigned_client_id = Some(Arc::from("broker-made"));
    assert_eq!(assign_in_connack(&encode_connack(&named), ID.as_bytes(), 1 << 20), Ok(None));
    assert_eq!(assign_in_connack(&[0xf0, 0x02, 0x18, 0x00], ID.as_bytes(), 1 << 20), Ok(None));
    // Malformed ones and one over the limit: errors.
    for bad in
        [&[0x20, 0x03, 0x00, 0x00][..], &[0x20, 0x03, 0x00, 0x00, 0x05], &[0x20, 0x04, 0x00, 0x00, 0x02, 0x99, 0x00]]
    {
        assert!(matches!(assign_in_connack(bad, ID.as_bytes(), 1 << 20), Err(ConnackError::Malformed(_))), "{bad:?}");
    }
    assert!(matches!(assign_in_connack(&ok, ID.as_bytes(), 10), Err(ConnackError::TooLarge { .. })));
}

proptest! {
    /// Whatever a successful CONNACK carries, with the id added it decodes, in two independent
    /// codecs, as the same CONNACK with Assigned Client Identifier set; every byte of the
    /// broker's is kept in order.
    #[test]
    fn the_connack_with_the_assigned_id_is_the_same_connack_plus_the_id(
        session_present in any::<bool>(),
        expiry in prop::option::of(any::<u32>()),
        receive_max in prop::option::of(1u16..),
        max_packet in prop::option::of(1u32..),
        topic_alias_max in prop::option::of(any::<u16>()),
        reason in prop::option::of("[ -~]{0,40}"),
        users in prop::collection::vec(("[a-z]{1,8}", "[ -~]{0,20}"), 0..4),
        keep_alive in prop::option::of(any::<u16>()),
        wildcards in prop::option::of(any::<bool>()),
        padding in 0usize..200,
    ) {
        let mut c = mqtt_proto::v5::Connack::new(session_present, mqtt_proto::v5::ConnectReasonCode::Success);
        c.properties.session_expiry_interval = expiry;
        c.properties.receive_max = receive_max;
        c.properties.max_packet_size = max_packet;
        c.properties.topic_alias_max = topic_alias_max;
        // A long reason string makes the remaining length take two bytes.
        c.properties.reason_string = reason.map(|r| Arc::from(format!("{r}{}", "x".repeat(padding)).as_str()));
        c.properties.user_properties = users
            .iter()
            .map(|(n, v)| mqtt_proto::v5::UserProperty { name: Arc::from(n.as_str()), value: Arc::from(v.as_str()) })
            .collect();
        c.properties.server_keep_alive = keep_alive;
        c.properties.wildcard_subscription_available = wildcards;
        let bytes = encode_connack(&c);
        let out = assign_in_connack(&bytes, ID.as_bytes(), 1 << 20).unwrap().unwrap();
        let mut expected = c.clone();
        expected.properties.assigned_client_id = Some(Arc::from(ID));
        prop_assert_eq!(decode_connack(&out), expected);
        let mb = mqttbytes_connack(&out);
        prop_assert_eq!(mb.session_present, session_present);
        let props = mb.properties.unwrap();
        prop_assert_eq!(props.assigned_client_identifier.as_deref(), Some(ID));
        prop_assert_eq!(props.user_properties.len(), users.len());
        // The broker's properties, in order, then the id.
        let tail = [&[0x12, 0x00, ID.len() as u8][..], ID.as_bytes()].concat();
        prop_assert!(out.ends_with(&tail));
        let props_of = |p: &[u8]| {
            let mut r = Reader { bytes: p, pos: 1 };
            r.var_int().unwrap();
            r.take(2).unwrap();
            let n = r.var_int().unwrap();
            r.take(n).unwrap().to_vec()
        };
        let (old, new) = (props_of(&bytes), props_of(&out));
        prop_assert_eq!(&new[..old.len()], &old[..]);
        // Adding the id again changes nothing.
        prop_assert_eq!(assign_in_connack(&out, ID.as_bytes(), 1 << 20).unwrap(), None);
    }

    /// Whatever the CONNECT, setting the client-id gives mqtt-proto's encoding of the same
    /// CONNECT with that id.
    #[test]
    fn the_connect_with_the_assigned_id_is_the_reference_encoding(
        keep_alive in any::<u16>(),
        expiry in prop::option::of(any::<u32>()),
        will in prop::option::of(("[a-z]{1,8}", prop::collection::vec(any::<u8>(), 0..20))),
        username in prop::option::of(text(12)),
        password in prop::option::of(prop::collection::vec(any::<u8>(), 0..12)),
        padding in 0usize..200,
    ) {
        let mut orig = mqtt_proto::v5::Connect::new(Arc::from(""), keep_alive);
        orig.properties.session_expiry_interval = expiry;
        orig.properties.auth_method = Some(Arc::from("x".repeat(padding).as_str()));
        orig.last_will = will.map(|(t, m)| mqtt_proto::v5::LastWill {
            qos: mqtt_proto::QoS::Level1,
            retain: true,
            topic_name: mqtt_proto::TopicName::try_from(t.as_str()).unwrap(),
            payload: m.into(),
            properties: Default::default(),
        });
        orig.username = username.as_deref().map(Arc::from);
        orig.password = password.map(Into::into);
        let out = set_client_id(&encode_v5(&orig), MqttVersion::V5, ID.as_bytes(), 1 << 20).unwrap();
        let mut expected = orig.clone();
        expected.client_id = Arc::from(ID);
        prop_assert_eq!(&out, &encode_v5(&expected));
        prop_assert_eq!(decode_v5(&out), expected);
    }
}
