//! Who may change things through the admin server: the bearer tokens of `[admin] token_file`.
//! The file is re-read when its modification time or size changes, at request time (no
//! watcher: the admin server asks at most once per mutating request). Tokens are compared in
//! constant time and never logged; without a token file, mutating endpoints are refused.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

/// A token file larger than this is refused: it holds a handful of short lines.
pub const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

/// The tokens in a token file's text: one per line, surrounding whitespace trimmed; blank
/// lines and lines starting with `#` are skipped.
pub fn parse(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

/// Whether `a` and `b` are equal, in time that depends only on their lengths: every byte
/// position up to the longer length is visited whatever the contents, and a length mismatch
/// is folded into the same accumulator instead of returning early.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..n {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// What a request's credentials come to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No `[admin] token_file`: mutating endpoints are off.
    NoTokenFile,
    /// No `Authorization: Bearer` header, or a token that is not in the file.
    Unauthorized,
    /// The token file is configured but cannot be read (the reason, without its contents).
    Unreadable(String),
}

/// The configured token file and what was last read from it.
#[derive(Debug)]
pub struct Tokens {
    path: Option<PathBuf>,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    /// Modification time and size of the file when it was read.
    stamp: Option<(SystemTime, u64)>,
    tokens: Vec<Vec<u8>>,
}

impl Tokens {
    pub fn new(path: Option<PathBuf>) -> Tokens {
        Tokens { path, cache: Mutex::default() }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Checks the value of an `Authorization` header (if any) against the file's tokens.
    pub fn check(&self, authorization: Option<&[u8]>) -> Verdict {
        let Some(path) = &self.path else {
            return Verdict::NoTokenFile;
        };
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(reason) = refresh(path, &mut cache) {
            return Verdict::Unreadable(reason);
        }
        let Some(presented) = authorization.and_then(bearer) else {
            return Verdict::Unauthorized;
        };
        // Every token is compared, so the time taken does not say which one matched.
        let matched = cache.tokens.iter().fold(false, |m, t| m | constant_time_eq(t, presented));
        if matched {
            Verdict::Allowed
        } else {
            Verdict::Unauthorized
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Re-reads the file when its modification time or size differ from the last read.
fn refresh(path: &Path, cache: &mut Cache) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_TOKEN_FILE_BYTES {
        return Err(format!("{}: larger than {MAX_TOKEN_FILE_BYTES} bytes", path.display()));
    }
    let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
    if cache.stamp == Some(stamp) {
        return Ok(());
    }
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    cache.tokens = parse(&text);
    cache.stamp = Some(stamp);
    tracing::info!(file = %path.display(), tokens = cache.tokens.len(), "admin token file read");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_lines_without_blanks_comments_or_surrounding_space() {
        let got = parse("# operators\n  alpha-1 \n\n\tbeta\r\n#gamma\n");
        assert_eq!(got, vec![b"alpha-1".to_vec(), b"beta".to_vec()]);
        assert!(parse("").is_empty());
        assert!(parse("# only a comment\n   \n").is_empty());
    }

    #[test]
    fn comparison_is_equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"), "a longer value is not a match");
        assert!(!constant_time_eq(b"secret", b"secre"), "a prefix is not a match");
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
        // Equal contents padded with the filler byte still differ by length.
        assert!(!constant_time_eq(b"ab", b"ab\0"));
    }

    #[test]
    fn bearer_header_values() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearerabc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bear"), None);
    }

    #[test]
    fn the_file_decides_and_is_re_read_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        assert_eq!(Tokens::new(None).check(Some(b"Bearer x")), Verdict::NoTokenFile);
        let t = Tokens::new(Some(path.clone()));
        assert!(matches!(t.check(Some(b"Bearer x")), Verdict::Unreadable(_)), "missing file");
        fs::write(&path, "one\ntwo\n").unwrap();
        assert_eq!(t.check(Some(b"Bearer one")), Verdict::Allowed);
        assert_eq!(t.check(Some(b"Bearer two")), Verdict::Allowed);
        assert_eq!(t.check(Some(b"Bearer three")), Verdict::Unauthorized);
        assert_eq!(t.check(None), Verdict::Unauthorized);
        assert_eq!(t.check(Some(b"one")), Verdict::Unauthorized, "the scheme is required");
        // A different size is a change whatever the clock's resolution.
        fs::write(&path, "three-3\n").unwrap();
        assert_eq!(t.check(Some(b"Bearer three-3")), Verdict::Allowed);
        assert_eq!(t.check(Some(b"Bearer one")), Verdict::Unauthorized, "removed tokens stop working");
        fs::write(&path, "").unwrap();
        assert_eq!(t.check(Some(b"Bearer three-3")), Verdict::Unauthorized, "an empty file lets nobody in");
        fs::write(&path, vec![b'a'; MAX_TOKEN_FILE_BYTES as usize + 1]).unwrap();
        assert!(matches!(t.check(Some(b"Bearer a")), Verdict::Unreadable(_)));
    }
}
