#!/usr/bin/env bash
# The demo boot: GRUB → Ally → the test guest (Debian's kernel + busybox) from disk, under
# Bochs (or QEMU/KVM with nested VT-x). Prints the guest's and Ally's marker lines and the
# checks. Extra arguments go to `ally-run demo` (e.g. --cpus 2, --ally-options "...", --keep).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
./scripts/setup.sh </dev/null
exec cargo run -q -p ally-runner --bin ally-run -- demo "$@"
