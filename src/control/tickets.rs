//! TLS session tickets: who can read a ticket, and for which listener. Without `ticket_keys`,
//! one process-wide key that rustls rotates every 6 hours, kept across reloads. With it, the
//! keys in that file (shared by every replica through a Secret), so a device resumes through
//! whichever replica the load balancer picks. Either way a ticket is bound to its listener's
//! client-authentication context: a ticket issued under one listener, or under a client CA
//! bundle since changed, does not resume; the client gets a full handshake instead.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM_SIV, NONCE_LEN};
use base64::Engine;
use rustls::server::ProducesTickets;
use sha2::{Digest, Sha256};

use super::config::ClientAuth;

/// Lifetime hint sent with tickets made from `ticket_keys`: rustls' own rotation period, so
/// clients drop them as early as they drop tickets of the process-wide key.
const FILE_TICKET_LIFETIME: u32 = 6 * 60 * 60;
const NAME_LEN: usize = 16;
const TAG_LEN: usize = 16;
/// Shortest secret accepted per line of a key file (decoded bytes).
pub const MIN_SECRET_LEN: usize = 32;
/// How to make a key, for the errors about a key file.
const MAKE_ONE: &str = "make one with `openssl rand -base64 48`";

/// What a ticket is bound to: the listener and who it lets in (its client CAs, and a digest
/// of the certificates its revocation lists revoke). Any change to these makes the listener's
/// earlier tickets fail to resume.
pub fn context<'a>(
    listener: &str,
    auth: ClientAuth,
    client_cas: impl Iterator<Item = &'a [u8]>,
    revoked: &[u8],
) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"harbormaster ticket context\0");
    h.update(listener.as_bytes());
    h.update([0, auth as u8]);
    for ca in client_cas {
        h.update((ca.len() as u64).to_be_bytes());
        h.update(ca);
    }
    // Only with lists: without, the context is what it was before lists existed, so replicas
    // of either version resume each other's tickets during a rolling upgrade.
    if !revoked.is_empty() {
        h.update(b"\0revoked\0");
        h.update(revoked);
    }
    let mut out = [0; 16];
    out.copy_from_slice(&h.finalize()[..16]);
    out
}

/// The process-wide rotating key, made once so that a reload does not void every ticket.
pub fn local(context: [u8; 16]) -> Result<Arc<dyn ProducesTickets>, String> {
    static LOCAL: OnceLock<Result<Arc<dyn ProducesTickets>, String>> = OnceLock::new();
    let inner = LOCAL.get_or_init(|| rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| e.to_string())).clone()?;
    Ok(Arc::new(Bound { inner, context }))
}

/// The keys of a `ticket_keys` file, bound to `context`.
pub fn from_file(path: &Path, context: [u8; 16]) -> Result<Arc<dyn ProducesTickets>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let keys = parse_keys(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Arc::new(Bound { inner: Arc::new(keys), context }))
}

/// A warning when others than this process may read the key file (`tls::readers`): with
/// the keys, a recorded ticket gives its session's secrets, so one can resume as the device
/// that held it.
pub fn exposed(path: &Path) -> Option<String> {
    super::tls::readers(path).map(|(mode, who, fix)| {
        format!(
            "{} can be read by {who} (mode {mode:o}); whoever reads it can resume as any device holding a \
             ticket: chmod {fix}",
            path.display()
        )
    })
}

/// One key per line, base64 of at least [`MIN_SECRET_LEN`] random bytes; blank lines and
/// `#` comments are skipped. The first key encrypts, every key decrypts.
fn parse_keys(text: &str) -> Result<FileKeys, String> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let secret = base64::engine::general_purpose::STANDARD
            .decode(line)
            .map_err(|e| format!("line {}: not base64 ({e})", n + 1))?;
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!(
                "line {}: a key needs at least {MIN_SECRET_LEN} random bytes, this one has {} ({MAKE_ONE})",
                n + 1,
                secret.len()
            ));
        }
        keys.push(TicketKey::derive(&secret)?);
    }
    if keys.is_empty() {
        return Err(format!("no key: one per line, base64 of at least {MIN_SECRET_LEN} random bytes ({MAKE_ONE})"));
    }
    Ok(FileKeys { keys })
}

/// A key of a `ticket_keys` file: its name (sent in clear at the front of each ticket, so the
/// key that made it is found without trying them all) and its AEAD key, both derived from the
/// line's secret. AES-256-GCM-SIV: nonces are random, and a repeated one reveals only that two
/// tickets are equal, not the key.
struct TicketKey {
    name: [u8; NAME_LEN],
    aead: LessSafeKey,
}

impl TicketKey {
    fn derive(secret: &[u8]) -> Result<TicketKey, String> {
        let name = Sha256::new().chain_update(b"harbormaster ticket key name\0").chain_update(secret).finalize();
        let key = Sha256::new().chain_update(b"harbormaster ticket key aead\0").chain_update(secret).finalize();
        let aead = UnboundKey::new(&AES_256_GCM_SIV, &key).map_err(|e| format!("ticket key: {e}"))?;
        let mut n = [0; NAME_LEN];
        n.copy_from_slice(&name[..NAME_LEN]);
        Ok(TicketKey { name: n, aead: LessSafeKey::new(aead) })
    }
}

struct FileKeys {
    keys: Vec<TicketKey>,
}

impl std::fmt::Debug for FileKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKeys").field("keys", &self.keys.len()).finish()
    }
}

impl ProducesTickets for FileKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        FILE_TICKET_LIFETIME
    }

    /// `name || nonce || sealed(plain) || tag`, the name also authenticated.
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let key = &self.keys[0];
        let mut nonce = [0; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let (head, body) = out.split_at_mut(NAME_LEN + NONCE_LEN);
        let tag = key
            .aead
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&head[..NAME_LEN]), body)
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < NAME_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = self.keys.iter().find(|k| k.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain_len = key.aead.open_in_place(nonce, Aad::from(name), &mut buf).ok()?.len();
        buf.truncate(plain_len);
        Some(buf)
    }
}

/// A ticketer whose tickets carry `context` inside the encryption: one made under another
/// context decrypts but does not match, and is refused like a forged one.
#[derive(Debug)]
struct Bound {
    inner: Arc<dyn ProducesTickets>,
    context: [u8; 16],
}

impl ProducesTickets for Bound {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut bound = Vec::with_capacity(self.context.len() + plain.len());
        bound.extend_from_slice(&self.context);
        bound.extend_from_slice(plain);
        self.inner.encrypt(&bound)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        let mut plain = self.inner.decrypt(ticket)?;
        if !plain.starts_with(&self.context) {
            return None;
        }
        // In place: a resumed handshake pays for no second copy of the session state.
        plain.drain(..self.context.len());
        Some(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_line(seed: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([seed; 48])
    }

    fn keys(lines: &[String]) -> Arc<dyn ProducesTickets> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys");
        std::fs::write(&p, lines.join("\n")).unwrap();
        from_file(&p, [7; 16]).unwrap()
    }

    #[test]
    fn a_ticket_opens_with_the_same_file_in_another_process() {
        // Two replicas load the same file: each has its own FileKeys, no state in common.
        let a = keys(&[key_line(1)]);
        let b = keys(&[key_line(1)]);
        let t = a.encrypt(b"session state").unwrap();
        assert_eq!(b.decrypt(&t).unwrap(), b"session state");
        assert_ne!(&t[NAME_LEN + NONCE_LEN..t.len() - TAG_LEN], b"session state".as_slice(), "encrypted");
        assert_eq!(a.lifetime(), FILE_TICKET_LIFETIME);
    }

    #[test]
    fn rotation_new_key_first_old_key_still_opens() {
        let old = keys(&[key_line(1)]);
        let rotated = keys(&[key_line(2), key_line(1)]);
        let before = old.encrypt(b"old").unwrap();
        assert_eq!(rotated.decrypt(&before).unwrap(), b"old", "the second key still decrypts");
        let after = rotated.encrypt(b"new").unwrap();
        assert!(old.decrypt(&after).is_none(), "the first key encrypts; the old file cannot read it");
        let dropped = keys(&[key_line(2)]);
        assert!(dropped.decrypt(&before).is_none(), "a removed key's tickets are void");
    }

    #[test]
    fn forged_truncated_or_other_context_tickets_are_refused() {
        let k = keys(&[key_line(1)]);
        let mut t = k.encrypt(b"state").unwrap();
        for cut in [0, NAME_LEN, NAME_LEN + NONCE_LEN + TAG_LEN - 1, t.len() - 1] {
            assert!(k.decrypt(&t[..cut]).is_none(), "cut at {cut}");
        }
        let last = t.len() - 1;
        t[last] ^= 1;
        assert!(k.decrypt(&t).is_none(), "tag flipped");
        t[last] ^= 1;
        t[0] ^= 1;
        assert!(k.decrypt(&t).is_none(), "unknown key name");
        t[0] ^= 1;
        assert_eq!(k.decrypt(&t).unwrap(), b"state");

        // Same keys, another listener or client CA: the ticket decrypts but is refused.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys");
        std::fs::write(&p, key_line(1)).unwrap();
        let other = from_file(&p, [8; 16]).unwrap();
        assert!(other.decrypt(&t).is_none());
        let local_a = local([1; 16]).unwrap();
        let local_b = local([2; 16]).unwrap();
        let lt = local_a.encrypt(b"state").unwrap();
        assert_eq!(local_a.decrypt(&lt).unwrap(), b"state");
        assert!(local_b.decrypt(&lt).is_none());
        assert_eq!(local([1; 16]).unwrap().decrypt(&lt).unwrap(), b"state", "one local key per process");
    }

    #[test]
    fn the_context_changes_with_listener_auth_and_cas() {
        let base = context("mqtts", ClientAuth::Optional, [b"ca1".as_slice()].into_iter(), &[]);
        assert_eq!(base, context("mqtts", ClientAuth::Optional, [b"ca1".as_slice()].into_iter(), &[]));
        assert_ne!(base, context("other", ClientAuth::Optional, [b"ca1".as_slice()].into_iter(), &[]));
        assert_ne!(base, context("mqtts", ClientAuth::Required, [b"ca1".as_slice()].into_iter(), &[]));
        assert_ne!(base, context("mqtts", ClientAuth::Optional, [b"ca2".as_slice()].into_iter(), &[]));
        assert_ne!(base, context("mqtts", ClientAuth::Optional, [b"ca1".as_slice(), b"ca2"].into_iter(), &[]));
        let revoked = context("mqtts", ClientAuth::Optional, [b"ca1".as_slice()].into_iter(), &[1; 32]);
        assert_ne!(base, revoked);
        assert_ne!(revoked, context("mqtts", ClientAuth::Optional, [b"ca1".as_slice()].into_iter(), &[2; 32]));
    }

    #[test]
    fn a_key_file_others_can_read_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys");
        std::fs::write(&p, key_line(1)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = exposed(&p).unwrap();
        assert!(w.contains("every user of the machine (mode 644)") && w.ends_with("chmod go-r"), "{w}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(exposed(&p), None);
    }

    #[test]
    fn key_files_that_are_refused() {
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 31]);
        for (text, want) in [
            ("", "no key"),
            ("# only a comment\n\n", "no key"),
            ("not base64!", "line 1: not base64"),
            (&format!("# c\n{short}"), "line 2: a key needs at least 32 random bytes, this one has 31"),
        ] {
            let err = parse_keys(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let ok = parse_keys(&format!("# current\n{}\n\n  {}  \n", key_line(1), key_line(2))).unwrap();
        assert_eq!(ok.keys.len(), 2);
    }
}
