//! The DPI crate (engine included) must build for Ally's bare-metal target.

use std::process::Command;

#[test]
fn builds_for_x86_64_unknown_none() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    // A separate target dir: the outer `cargo test` may still hold its own build lock.
    let target_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bare-metal");
    let out = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "ally-dpi",
            "--target",
            "x86_64-unknown-none",
        ])
        .args(["--manifest-path", manifest])
        .env("CARGO_TARGET_DIR", &target_dir)
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo build -p ally-dpi --target x86_64-unknown-none failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
