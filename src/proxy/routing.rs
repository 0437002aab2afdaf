//! Routing rules: a listener's ordered `[[listener.route]]` rules, each a set of conditions on
//! what is known about a connection once its CONNECT is read (SNI, ALPN, certificate, source
//! address, username, client-id) and the pool it sends matching connections to. The first rule
//! whose conditions all hold wins; the listener's `pool` takes the rest.
//!
//! Rules are compiled when the config is loaded (names lowercased, CIDRs parsed), and matching
//! them compares borrowed bytes only: no allocation, no lookup beyond the rules themselves.

use std::net::IpAddr;

use ipnet::IpNet;

use super::snapshot::canonical_ip;

/// One compiled rule: every condition set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteRule {
    /// The pool matching connections go to.
    pub pool: String,
    pub when: Conditions,
}

/// The conditions of one rule; `None` (or an empty `source`) is no condition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conditions {
    /// The SNI, lowercased; compared without regard to ASCII case.
    pub sni: Option<String>,
    /// A DNS suffix, lowercased. `"example.com"` matches `example.com` and every name below it
    /// (`a.example.com`), never `badexample.com`; `".example.com"` only the names below it.
    pub sni_suffix: Option<String>,
    /// The negotiated ALPN protocol, byte for byte.
    pub alpn: Option<Vec<u8>>,
    /// The verified client certificate's subject CN (as passed on to brokers).
    pub cert_cn: Option<String>,
    /// The verified client certificate's issuer CN.
    pub cert_issuer_cn: Option<String>,
    /// The CONNECT's username, byte for byte.
    pub username: Option<Vec<u8>>,
    /// A prefix of the CONNECT's client-id, byte for byte.
    pub client_id_prefix: Option<Vec<u8>>,
    /// The client's address (after an inbound PROXY header) is in one of these.
    pub source: Vec<IpNet>,
}

/// What a connection offers the rules, all borrowed from its setup.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteInput<'a> {
    pub sni: Option<&'a str>,
    pub alpn: Option<&'a [u8]>,
    pub cert_cn: Option<&'a str>,
    pub cert_issuer_cn: Option<&'a str>,
    pub username: Option<&'a [u8]>,
    pub client_id: &'a [u8],
    pub source: Option<IpAddr>,
}

/// The first rule matching `input`, with its index, or `None`: the listener's own pool.
pub fn first_match<'r>(rules: &'r [RouteRule], input: &RouteInput<'_>) -> Option<(usize, &'r RouteRule)> {
    rules.iter().enumerate().find(|(_, r)| r.when.hold(input))
}

impl Conditions {
    /// Whether every condition holds for `input`. A condition on something the connection
    /// does not have (no SNI, no certificate, no username) does not hold.
    pub fn hold(&self, input: &RouteInput<'_>) -> bool {
        fn eq(want: &Option<impl AsRef<[u8]>>, have: Option<&[u8]>) -> bool {
            match want {
                None => true,
                Some(w) => have == Some(w.as_ref()),
            }
        }
        if let Some(sni) = &self.sni {
            if !input.sni.is_some_and(|s| s.eq_ignore_ascii_case(sni)) {
                return false;
            }
        }
        if let Some(suffix) = &self.sni_suffix {
            if !input.sni.is_some_and(|s| sni_suffix_matches(s, suffix)) {
                return false;
            }
        }
        if let Some(prefix) = &self.client_id_prefix {
            if !input.client_id.starts_with(prefix) {
                return false;
            }
        }
        if !self.source.is_empty() {
            let Some(ip) = input.source.map(canonical_ip) else {
                return false;
            };
            if !self.source.iter().any(|n| n.contains(&ip)) {
                return false;
            }
        }
        eq(&self.alpn, input.alpn)
            && eq(&self.cert_cn, input.cert_cn.map(str::as_bytes))
            && eq(&self.cert_issuer_cn, input.cert_issuer_cn.map(str::as_bytes))
            && eq(&self.username, input.username)
    }

    /// Whether the rule holds for every connection: no conditions, or only ones that always
    /// hold (an empty client-id prefix, sources covering all of IPv4 and IPv6). Rules after it
    /// can never match.
    pub fn catch_all(&self) -> bool {
        let all_sources = self.source.is_empty()
            || (self.source.iter().any(|n| matches!(n, IpNet::V4(v) if v.prefix_len() == 0))
                && self.source.iter().any(|n| matches!(n, IpNet::V6(v) if v.prefix_len() == 0)));
        self.sni.is_none()
            && self.sni_suffix.is_none()
            && self.alpn.is_none()
            && self.cert_cn.is_none()
            && self.cert_issuer_cn.is_none()
            && self.username.is_none()
            && self.client_id_prefix.as_ref().is_none_or(|p| p.is_empty())
            && all_sources
    }

    /// The conditions in config spelling, for the log and `route` (`sni=a.example.com,username=x`).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        if let Some(v) = &self.sni {
            parts.push(format!("sni={v}"));
        }
        if let Some(v) = &self.sni_suffix {
            parts.push(format!("sni_suffix={v}"));
        }
        if let Some(v) = &self.alpn {
            parts.push(format!("alpn={}", text(v)));
        }
        if let Some(v) = &self.cert_cn {
            parts.push(format!("cert_cn={v}"));
        }
        if let Some(v) = &self.cert_issuer_cn {
            parts.push(format!("cert_issuer_cn={v}"));
        }
        if let Some(v) = &self.username {
            parts.push(format!("username={}", text(v)));
        }
        if let Some(v) = &self.client_id_prefix {
            parts.push(format!("client_id_prefix={}", text(v)));
        }
        if !self.source.is_empty() {
            let nets: Vec<String> = self.source.iter().map(IpNet::to_string).collect();
            parts.push(format!("source={}", nets.join("|")));
        }
        parts.join(",")
    }
}

/// `name` is `suffix` or below it, label-aligned (`suffix` without a leading dot), or ends
/// with `suffix` (with one); ASCII case ignored. `suffix` is lowercased and not empty.
fn sni_suffix_matches(name: &str, suffix: &str) -> bool {
    let (n, s) = (name.as_bytes(), suffix.as_bytes());
    if n.len() < s.len() || !n[n.len() - s.len()..].eq_ignore_ascii_case(s) {
        return false;
    }
    s.first() == Some(&b'.') || n.len() == s.len() || n[n.len() - s.len() - 1] == b'.'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pool: &str, when: Conditions) -> RouteRule {
        RouteRule { pool: pool.into(), when }
    }

    fn input() -> RouteInput<'static> {
        RouteInput {
            sni: Some("Tenant-A.Example.com"),
            alpn: Some(b"mqtt"),
            cert_cn: Some("device-1"),
            cert_issuer_cn: Some("Fleet CA"),
            username: Some(b"alice"),
            client_id: b"truck-42",
            source: Some("10.1.2.3".parse().unwrap()),
        }
    }

    #[test]
    fn each_condition_holds_or_not() {
        let i = input();
        let yes = [
            Conditions { sni: Some("tenant-a.example.com".into()), ..Default::default() },
            Conditions { sni_suffix: Some("example.com".into()), ..Default::default() },
            Conditions { sni_suffix: Some(".example.com".into()), ..Default::default() },
            Conditions { sni_suffix: Some("tenant-a.example.com".into()), ..Default::default() },
            Conditions { alpn: Some(b"mqtt".to_vec()), ..Default::default() },
            Conditions { cert_cn: Some("device-1".into()), ..Default::default() },
            Conditions { cert_issuer_cn: Some("Fleet CA".into()), ..Default::default() },
            Conditions { username: Some(b"alice".to_vec()), ..Default::default() },
            Conditions { client_id_prefix: Some(b"truck-".to_vec()), ..Default::default() },
            Conditions { source: vec!["10.0.0.0/8".parse().unwrap()], ..Default::default() },
        ];
        for c in &yes {
            assert!(c.hold(&i), "{c:?}");
        }
        let no = [
            Conditions { sni: Some("tenant-b.example.com".into()), ..Default::default() },
            Conditions { sni_suffix: Some("ample.com".into()), ..Default::default() },
            Conditions { sni_suffix: Some(".tenant-a.example.com".into()), ..Default::default() },
            Conditions { alpn: Some(b"mqtt5".to_vec()), ..Default::default() },
            Conditions { cert_cn: Some("Device-1".into()), ..Default::default() },
            Conditions { cert_issuer_cn: Some("Other CA".into()), ..Default::default() },
            Conditions { username: Some(b"bob".to_vec()), ..Default::default() },
            Conditions { client_id_prefix: Some(b"car-".to_vec()), ..Default::default() },
            Conditions { source: vec!["192.168.0.0/16".parse().unwrap()], ..Default::default() },
            // All must hold.
            Conditions {
                sni: Some("tenant-a.example.com".into()),
                username: Some(b"bob".to_vec()),
                ..Default::default()
            },
        ];
        for c in &no {
            assert!(!c.hold(&i), "{c:?}");
        }
    }

    #[test]
    fn a_condition_on_something_missing_does_not_hold() {
        let bare = RouteInput { client_id: b"x", ..Default::default() };
        for c in [
            Conditions { sni_suffix: Some("com".into()), ..Default::default() },
            Conditions { cert_cn: Some("".into()), ..Default::default() },
            Conditions { username: Some(Vec::new()), ..Default::default() },
            Conditions { source: vec!["0.0.0.0/0".parse().unwrap()], ..Default::default() },
        ] {
            assert!(!c.hold(&bare), "{c:?}");
        }
        assert!(Conditions::default().hold(&bare));
    }

    #[test]
    fn ipv4_mapped_sources_match_ipv4_cidrs() {
        let c = Conditions { source: vec!["10.0.0.0/8".parse().unwrap()], ..Default::default() };
        let i = RouteInput { source: Some("::ffff:10.9.9.9".parse().unwrap()), ..Default::default() };
        assert!(c.hold(&i));
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let rules = vec![
            rule("a", Conditions { username: Some(b"bob".to_vec()), ..Default::default() }),
            rule("b", Conditions { client_id_prefix: Some(b"truck-".to_vec()), ..Default::default() }),
            rule("c", Conditions::default()),
        ];
        let (i, r) = first_match(&rules, &input()).unwrap();
        assert_eq!((i, r.pool.as_str()), (1, "b"));
        assert!(first_match(&rules[..1], &input()).is_none());
    }

    #[test]
    fn catch_alls_are_recognised() {
        assert!(Conditions::default().catch_all());
        assert!(Conditions { client_id_prefix: Some(Vec::new()), ..Default::default() }.catch_all());
        let both = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
        assert!(Conditions { source: both, ..Default::default() }.catch_all());
        let v4 = vec!["0.0.0.0/0".parse().unwrap()];
        assert!(!Conditions { source: v4, ..Default::default() }.catch_all());
        assert!(!Conditions { alpn: Some(b"mqtt".to_vec()), ..Default::default() }.catch_all());
    }

    #[test]
    fn describe_names_every_condition() {
        let c = Conditions {
            sni_suffix: Some(".example.com".into()),
            username: Some(b"alice".to_vec()),
            source: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(c.describe(), "sni_suffix=.example.com,username=alice,source=10.0.0.0/8");
    }
}
