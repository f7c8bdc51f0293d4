#!/usr/bin/env bash
# Install what vsnap's demo, tests and benchmarks need on Debian 12
# (bookworm). Idempotent: a second run installs nothing and says so.
# Run as root (or with sudo); without root it only reports what is missing.
set -euo pipefail

PACKAGES=(
    qemu-utils      # qemu-img, qemu-io: every snapshot step
    qemu-system-x86 # qemu-system-x86_64: live-domain tests
    btrfs-progs     # mkfs.btrfs: reflink and subvolume snapshots
    e2fsprogs       # mkfs.ext4: a filesystem without reflink
    util-linux      # losetup, mount
    procps          # ps, pgrep: tests watch their QEMU processes
)

say() { printf 'setup: %s\n' "$*"; }

missing=()
for p in "${PACKAGES[@]}"; do
    if dpkg -s "$p" >/dev/null 2>&1 && [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ]; then
        say "$p: already installed ($(dpkg-query -W -f='${Version}' "$p"))"
    else
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    say "all Debian packages present; nothing installed"
else
    say "missing: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        say "not root: cannot install them. Run: sudo $0" >&2
        exit 2
    fi
    say "running apt-get update"
    apt-get update -qq
    say "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
    say "installed: ${missing[*]}"
fi

# Rust: cargo comes with the machine (rustup); root's PATH may lack it
# under sudo.
if ! command -v cargo >/dev/null 2>&1; then
    for d in "${CARGO_HOME:-}/bin" "$HOME/.cargo/bin" /root/.cargo/bin; do
        if [ -x "$d/cargo" ]; then
            say "cargo is in $d but not on PATH: run  export PATH=\"$d:\$PATH\"  (or sudo -E) and try again" >&2
            exit 2
        fi
    done
    say "cargo not found: install Rust (rustup, toolchain >= 1.89) and put cargo on PATH" >&2
    exit 2
fi
say "cargo: $(cargo --version)"
for t in qemu-img qemu-io; do
    command -v "$t" >/dev/null 2>&1 || { say "$t still missing after install" >&2; exit 2; }
done
say "qemu-img: $(qemu-img --version | head -n1)"
command -v qemu-system-x86_64 >/dev/null 2>&1 && say "qemu-system-x86_64: $(qemu-system-x86_64 --version | head -n1)"
say "ready"
