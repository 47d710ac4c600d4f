//! Shared helpers for the end-to-end tests.

use std::path::PathBuf;

use ally_runner::{Check, RunOptions, RunResult};

/// `ALLY_IMAGE`, when set, names a prebuilt Ally image (scripts/test.sh builds it once and
/// passes it, so the test does not run cargo from inside `cargo test`).
pub fn prebuilt_ally_image() -> Option<PathBuf> {
    std::env::var_os("ALLY_IMAGE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `ALLY_ATTACK`, when set, names a prebuilt guest attacker (`ally-attack` for
/// x86_64-unknown-linux-musl; scripts/test.sh builds it once and passes it).
pub fn prebuilt_attack_binary() -> Option<PathBuf> {
    std::env::var_os("ALLY_ATTACK")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Points `opts` at the prebuilt Ally image and attacker when scripts/test.sh gave them;
/// otherwise the run builds them, in a target directory of its own (cargo keeps the
/// workspace's locked while this test runs).
pub fn use_prebuilt_binaries(opts: &mut RunOptions) {
    opts.ally_image = prebuilt_ally_image();
    opts.attack_binary = prebuilt_attack_binary();
    if opts.ally_image.is_none() || opts.attack_binary.is_none() {
        opts.ally_target_dir = Some(opts.out_root.join("cargo-target"));
    }
}

/// The failed checks of a run, one per line, for an assertion message.
pub fn failures(result: &RunResult) -> String {
    result
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(Check::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The check named `name` (panics when the runner did not produce it: a renamed check must
/// not silently drop out of the e2e suite).
pub fn check<'a>(result: &'a RunResult, name: &str) -> &'a Check {
    result
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("the runner produced no `{name}` check"))
}
