#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine to build and run Ally under Bochs and QEMU.
# Idempotent and fast when everything is already in place. Run as root (apt); the guest
# debs go to ${ALLY_CACHE:-$HOME/.cache/ally}/debs and are reused between runs.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${ALLY_CACHE:-$HOME/.cache/ally}"
export DEBIAN_FRONTEND=noninteractive

log() { printf 'setup: %s\n' "$*"; }

# `apt-get update` at most once per run, and only when something is missing.
apt_updated=0
apt_update_once() {
    if ((apt_updated == 0)) && [[ $(id -u) -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
}

# --- host packages -------------------------------------------------------------------------
# bochs*: the emulator (VMX+EPT, e1000, slirp); grub-pc-bin/grub-common/xorriso/mtools: the
# boot ISO (grub-mkrescue); syslinux/fdisk/dosfstools/mtools: the guest disk without root or
# loop devices; cpio/gzip: the initramfs; xz-utils/zstd: Debian's compressed kernel modules;
# bsdutils (script): a pseudo-terminal for Bochs' term display; python3: e2e helpers;
# qemu-system-x86 (Debian 12: QEMU 7.2, with SeaBIOS and the e1000's iPXE ROM as dependencies):
# `--emulator qemu-tcg` (Ally's SVM backend on an emulated AMD CPU, and quick baselines) and
# `--emulator qemu` (KVM); libhyperscan-dev: the benchmark's reference scanner
# (`ally-tools --features hyperscan`, the same literals and payloads as Ally's prefilter).
packages=(
    bochs bochsbios vgabios bochs-term qemu-system-x86 libhyperscan-dev
    grub-pc-bin grub-common xorriso mtools
    syslinux syslinux-common isolinux dosfstools fdisk
    cpio gzip xz-utils zstd bsdutils python3
)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "missing packages ${missing[*]}: run this script as root" >&2
        exit 1
    fi
    log "installing ${missing[*]}"
    apt_update_once
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    log "host packages present"
fi

# --- Rust toolchain (rust-toolchain.toml pins the version and the bare-metal target) ---------
if ! command -v rustup >/dev/null 2>&1; then
    log "rustup not found: install it from https://rustup.rs first" >&2
    exit 1
fi
# `rustup toolchain install` with no argument installs what rust-toolchain.toml names
# (version, components, the targets: x86_64-unknown-none for Ally, x86_64-unknown-linux-musl
# for the guest's static attacker); skipped when both targets are there.
installed_targets="$(cd "$repo" && rustup target list --installed 2>/dev/null || true)"
for target in x86_64-unknown-none x86_64-unknown-linux-musl; do
    if ! grep -qx "$target" <<<"$installed_targets"; then
        log "installing the pinned Rust toolchain (target $target missing)"
        (cd "$repo" && rustup toolchain install)
        break
    fi
done
log "rust toolchain: $(cd "$repo" && rustc --version)"

# --- guest debs: Debian's kernel and busybox-static ------------------------------------------
mkdir -p "$cache/debs"
# linux-image-amd64 is a metapackage: resolve the real linux-image-6.1.0-*-amd64 it depends on.
resolve_kernel() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}
kernel_pkg="$(resolve_kernel)"
if [[ -z "$kernel_pkg" ]]; then
    apt_update_once
    kernel_pkg="$(resolve_kernel)"
fi
if [[ -z "$kernel_pkg" ]]; then
    log "cannot resolve linux-image-amd64 to a linux-image-<version>-amd64 package (apt-cache depends)" >&2
    exit 1
fi

fetch_deb() { # fetch_deb PACKAGE -> unpacks into $cache/debs/PACKAGE (once per version)
    local pkg="$1" ver dir
    ver="$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')"
    if [[ -z "$ver" || "$ver" == "(none)" ]]; then
        apt_update_once
        ver="$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')"
    fi
    if [[ -z "$ver" || "$ver" == "(none)" ]]; then
        log "package $pkg has no candidate version (apt-get update?)" >&2
        exit 1
    fi
    dir="$cache/debs/$pkg"
    if [[ -f "$dir/.version" && "$(cat "$dir/.version")" == "$ver" ]]; then
        log "$pkg $ver cached"
        return
    fi
    log "downloading $pkg $ver"
    rm -rf "$dir" "$cache/debs/dl-$pkg"
    mkdir -p "$cache/debs/dl-$pkg" "$dir"
    (cd "$cache/debs/dl-$pkg" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null)
    dpkg-deb -x "$cache/debs/dl-$pkg"/*.deb "$dir"
    rm -rf "$cache/debs/dl-$pkg"
    printf '%s\n' "$ver" >"$dir/.version"
}
fetch_deb "$kernel_pkg"
fetch_deb busybox-static
# The runner finds the kernel package through this link.
ln -sfn "$kernel_pkg" "$cache/debs/linux-image"
log "guest debs ready in $cache/debs (kernel: $kernel_pkg)"
