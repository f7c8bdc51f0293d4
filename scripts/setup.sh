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

# qemu-utils and qemu-system-x86 must come from one QEMU release: the
# machine may carry a qemu-utils from elsewhere (CI's image has 10.0 from
# bookworm-backports) while apt offers qemu-system-x86 7.2 only, and
# installing qemu-system-x86 alone then makes apt remove qemu-utils. So the
# two are installed in one apt transaction at one version: the version apt
# would install qemu-system-x86 at, qemu-utils moved to it (up or down).
QEMU_PAIR=(qemu-utils qemu-system-x86)

installed_version() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ] &&
        dpkg-query -W -f='${Version}' "$1"
}

missing=()
for p in "${PACKAGES[@]}"; do
    if v=$(installed_version "$p"); then
        say "$p: already installed ($v)"
    else
        missing+=("$p")
    fi
done

utils_v=$(installed_version qemu-utils || true)
system_v=$(installed_version qemu-system-x86 || true)
qemu_pair_ok=0
if [ -n "$utils_v" ] && [ "$utils_v" = "$system_v" ]; then
    qemu_pair_ok=1
elif [ -n "$utils_v" ] && [ -n "$system_v" ]; then
    say "qemu-utils $utils_v and qemu-system-x86 $system_v are of different QEMU releases"
fi

if [ "${#missing[@]}" -eq 0 ] && [ "$qemu_pair_ok" -eq 1 ]; then
    say "all Debian packages present; nothing installed"
else
    [ "${#missing[@]}" -eq 0 ] || say "missing: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        say "not root: cannot install them. Run: sudo $0" >&2
        exit 2
    fi
    say "running apt-get update"
    apt-get update -qq
    # Everything but the QEMU pair as it is; the pair pinned to one version.
    others=()
    for p in "${missing[@]}"; do
        case " ${QEMU_PAIR[*]} " in *" $p "*) ;; *) others+=("$p") ;; esac
    done
    pair=()
    if [ "$qemu_pair_ok" -eq 0 ]; then
        want=$system_v
        if [ -z "$want" ]; then
            want=$(apt-cache policy qemu-system-x86 | sed -n 's/^ *Candidate: //p')
        fi
        if [ -z "$want" ] || [ "$want" = "(none)" ]; then
            say "apt offers no qemu-system-x86: add a Debian 12 (bookworm) source and run again" >&2
            exit 2
        fi
        say "QEMU: qemu-utils and qemu-system-x86 at $want, in one transaction${utils_v:+ (qemu-utils was $utils_v)}"
        pair=("qemu-utils=$want" "qemu-system-x86=$want" "qemu-system-common=$want" "qemu-system-data")
    fi
    say "installing: ${others[*]} ${pair[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
        "${others[@]}" "${pair[@]}" </dev/null
    say "installed: ${others[*]} ${pair[*]}"
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
# Each QEMU tool must run, not just be on PATH (a half-removed package
# leaves binaries that fail to load their libraries).
for t in qemu-img qemu-io qemu-system-x86_64; do
    command -v "$t" >/dev/null 2>&1 || { say "$t still missing after install" >&2; exit 2; }
    out=$("$t" --version 2>&1) || { say "$t is installed but does not run: $out" >&2; exit 2; }
    say "$t: $(printf '%s\n' "$out" | head -n1)"
done
say "ready"
