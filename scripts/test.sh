#!/usr/bin/env bash
# The README's test command: every check Ally has, from a fresh clone on Debian 12.
#   setup (host packages, Rust, guest debs) → fmt → clippy (host and bare-metal) → unit tests
#   → the Ally image → the end-to-end boots under Bochs (or QEMU/KVM with nested VT-x).
# Works without a terminal or stdin (CI=true). Prints each step; exits non-zero on the first
# failure.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

step() { printf '\n==> %s\n' "$*"; }
started=$SECONDS

step "setup (scripts/setup.sh)"
./scripts/setup.sh </dev/null

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy (host crates)"
cargo clippy --all-targets -- -D warnings
cargo clippy -p ally-tests --features e2e --all-targets -- -D warnings

step "cargo clippy (bare-metal image)"
cargo clippy -p ally-boot --target x86_64-unknown-none -- -D warnings

step "cargo test (host unit and integration tests)"
cargo test

step "ally-tools with Hyperscan: clippy, and the prefilter against Hyperscan (--features hyperscan)"
cargo clippy -p ally-tools --features hyperscan --all-targets -- -D warnings
cargo test -p ally-tools --features hyperscan

step "build the Ally image"
cargo build -p ally-boot --release --target x86_64-unknown-none
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
case "$target_dir" in /*) ;; *) target_dir="$repo/$target_dir" ;; esac
export ALLY_IMAGE="$target_dir/x86_64-unknown-none/release/ally"
ls -l "$ALLY_IMAGE"

step "build the guest's attacker (ally-attack, static, for the test guest's initramfs)"
# The same command the runner uses (qemu-runner/src/attack.rs build_attack_binary).
cargo build -p ally-attack --release --target x86_64-unknown-linux-musl \
    --config 'profile.release.strip="debuginfo"'
export ALLY_ATTACK="$target_dir/x86_64-unknown-linux-musl/release/ally-attack"
ls -l "$ALLY_ATTACK"

# The Bochs boots (VMX), two at a time; then the QEMU boots (the guest alone on q35, Ally's
# SVM backend under QEMU's TCG on pc and q35), one at a time: each TCG QEMU keeps a host CPU
# per guest CPU busy.
step "end-to-end boots under Bochs (cargo test -p ally-tests --features e2e -- --skip qemu)"
cargo test -p ally-tests --features e2e -- --nocapture --skip qemu </dev/null

step "end-to-end boots under QEMU (cargo test -p ally-tests --features e2e -- --test-threads=1 qemu)"
cargo test -p ally-tests --features e2e -- --nocapture --test-threads=1 qemu </dev/null

step "all tests passed in $((SECONDS - started)) s"
