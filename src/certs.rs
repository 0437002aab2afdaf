//! `harbormaster certs`: certificates of the operator's own for `[listener.tls]` — a CA, a
//! server certificate signed by it for the names devices connect to, and optionally device
//! (client) certificates — as PEM files, ECDSA P-256, made with rcgen. Private keys are
//! written 0600; no existing file is ever overwritten. Nothing else calls it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The CA's validity: devices keep their certificates for years.
const CA_DAYS: u64 = 3650;

#[derive(clap::Args)]
pub struct Args {
    /// Folder to write the files into (created when missing).
    #[arg(long)]
    out: PathBuf,
    /// A DNS name or IP address devices connect to; repeat for more. The first is also the
    /// server certificate's CN.
    #[arg(long = "name", required = true)]
    names: Vec<String>,
    /// Also make a device certificate with this CN, written as DEVICE.pem and DEVICE.key;
    /// repeat for more. Letters, digits, '.', '_' and '-'.
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Validity of the server and device certificates, in days (the CA's is ten years).
    #[arg(long, default_value_t = 397)]
    days: u64,
}

pub fn main(args: Args) -> ExitCode {
    match write(&args) {
        Ok(files) => {
            println!("wrote, in {}:", args.out.display());
            for f in files {
                println!("  {f}");
            }
            println!(
                "for [listener.tls]: certs = [{{ cert = \"server.pem\", key = \"server.key\" }}], \
                 client_ca = \"ca.pem\" (paths relative to the config file's folder)\n\
                 keep ca.key offline: whoever has it can make certificates your listeners accept"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("harbormaster certs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The files of one run, by name, in the order they are written.
fn write(args: &Args) -> anyhow::Result<Vec<String>> {
    for d in &args.devices {
        let ok = d.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            && d.starts_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            bail!("--device {d:?}: use letters, digits, '.', '_' and '-', starting with a letter or digit");
        }
    }
    if args.days == 0 {
        bail!("--days must be at least 1");
    }
    let mut files: Vec<(String, String, bool)> = Vec::new(); // (name, PEM, secret)

    let now = rcgen::date_time_ymd(1970, 1, 1) + SystemTime::now().duration_since(UNIX_EPOCH)?;
    let days = |n: u64| Duration::from_secs(n * 86_400);
    let named = |sans: Vec<String>, cn: &str, valid_days: u64| -> anyhow::Result<CertificateParams> {
        let mut p = CertificateParams::new(sans).with_context(|| format!("{cn:?} is not a DNS name or IP address"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        // An hour back, for clocks a little behind.
        p.not_before = now - Duration::from_secs(3600);
        p.not_after = now + days(valid_days);
        Ok(p)
    };

    let ca_key = KeyPair::generate()?;
    let mut ca = named(Vec::new(), &format!("harbormaster CA for {}", args.names[0]), CA_DAYS)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    files.push(("ca.pem".into(), ca_cert.pem(), false));
    files.push(("ca.key".into(), ca_key.serialize_pem(), true));
    let issuer = Issuer::new(ca, &ca_key);

    let leaf = |sans: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = named(sans, cn, args.days)?;
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        Ok((p.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
    };
    let (pem, key) = leaf(args.names.clone(), &args.names[0], ExtendedKeyUsagePurpose::ServerAuth)?;
    files.push(("server.pem".into(), pem, false));
    files.push(("server.key".into(), key, true));
    for d in &args.devices {
        let (pem, key) = leaf(Vec::new(), d, ExtendedKeyUsagePurpose::ClientAuth)?;
        files.push((format!("{d}.pem"), pem, false));
        files.push((format!("{d}.key"), key, true));
    }

    // Nothing is written when any file is already there: a CA is never replaced by accident.
    let existing: Vec<&str> =
        files.iter().filter(|(name, _, _)| args.out.join(name).exists()).map(|(n, _, _)| n.as_str()).collect();
    if !existing.is_empty() {
        bail!("{} already has {}; nothing written", args.out.display(), existing.join(", "));
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    for (name, pem, secret) in &files {
        write_new(&args.out.join(name), pem, if *secret { 0o600 } else { 0o644 })?;
    }
    Ok(files.into_iter().map(|(name, _, _)| name).collect())
}

/// Creates `path` with `mode` (never replacing a file) and writes `text` into it.
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}
