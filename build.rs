//! Records the git commit the binary is built from as `HARBORMASTER_GIT_COMMIT` (for the
//! `harbormaster_build_info` metric): `git rev-parse --short HEAD`, or "unknown" when git or
//! the repository is not there (a source tarball, a container build context). Never fails.

use std::path::Path;
use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=HARBORMASTER_GIT_COMMIT={commit}");

    // Rerun when HEAD moves. Only files that exist are named: a missing one would make cargo
    // rerun this script, and rebuild the crate, on every build.
    println!("cargo:rerun-if-changed=build.rs");
    let head = Path::new(".git/HEAD");
    if head.is_file() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        if let Some(reference) =
            std::fs::read_to_string(head).ok().and_then(|h| h.strip_prefix("ref: ").map(|r| r.trim().to_string()))
        {
            let path = Path::new(".git").join(reference);
            if path.is_file() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
        if Path::new(".git/packed-refs").is_file() {
            println!("cargo:rerun-if-changed=.git/packed-refs");
        }
    }
}
