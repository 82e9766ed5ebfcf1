//! Records the commit this binary is built from, for `snapshotd_build_info`
//! and `--version`: `BUILT_FROM_COMMIT` from the environment when set (a
//! packager building from a tarball), else `git rev-parse`, else "unknown".
//! (Not a `SNAPSHOTD_` name: cargo passes it on to the binaries it runs,
//! where that prefix is read as configuration.)

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BUILT_FROM_COMMIT");
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = std::env::var("BUILT_FROM_COMMIT").ok().or_else(|| {
        let out = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        out.status.success().then(|| text.trim().to_string())
    });
    println!(
        "cargo:rustc-env=BUILT_FROM_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}
