#!/usr/bin/env bash
# Build the vsnap test guest from Debian packages only:
#   $VSNAP_GUEST_DIR/vmlinuz     a Debian kernel (linux-image-cloud-amd64's)
#   $VSNAP_GUEST_DIR/initrd.img  busybox, qemu-ga + its libraries, virtio
#                                modules, the writer, /init (cpio newc,
#                                uncompressed: boots faster under TCG)
#   $VSNAP_GUEST_DIR/manifest.txt  package versions and what went in
# VSNAP_GUEST_DIR defaults to <repo>/target/guest.
#
# Nothing is installed on the host: packages are fetched with
# `apt-get download` and unpacked with `dpkg -x` under $VSNAP_GUEST_DIR/cache.
#
# Cached: when the outputs exist and this folder's sources are unchanged,
# it returns at once without asking apt anything. VSNAP_GUEST_REFRESH=1 asks
# apt for the current package versions and rebuilds only if they changed.
# Same sources + same package versions + same rustc => same bytes.
#
# Other settings: VSNAP_GUEST_KERNEL=cloud-amd64|amd64 (the Debian kernel
# flavour; default cloud-amd64: it boots in half the time under TCG),
# VSNAP_GUEST_COMPRESS=none|gzip (the initramfs; default none, which saves
# about 0.5 s of boot under TCG), VSNAP_GUEST_QUIET=1 (less output).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
OUT=${VSNAP_GUEST_DIR:-$REPO/target/guest}
FLAVOUR=${VSNAP_GUEST_KERNEL:-cloud-amd64}
COMPRESS=${VSNAP_GUEST_COMPRESS:-none}
CACHE=$OUT/cache
# Modules the guest needs (with their depends= resolved at build time);
# those built into the chosen kernel are skipped. crc32c_generic stands for
# ext4/jbd2's soft dependency "crypto-crc32c".
MODULES=(virtio_pci virtio_blk virtio_console crc32c_generic ext4)

say() { [ "${VSNAP_GUEST_QUIET:-0}" = 1 ] || printf 'guest/build: %s\n' "$*" >&2; }
die() { printf 'guest/build: error: %s\n' "$*" >&2; exit 1; }

inputs_key() {
    {
        echo "flavour=$FLAVOUR compress=$COMPRESS modules=${MODULES[*]}"
        cd "$HERE"
        sha256sum build.sh mkinitramfs.py init shutdown writer/Cargo.toml writer/Cargo.lock writer/src/*.rs
    } | sha256sum | cut -c1-16
}

up_to_date() { # the outputs exist and were built from these sources
    [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] && [ -s "$OUT/stamp" ] &&
        grep -qx "inputs=$1" "$OUT/stamp"
}

KEY=$(inputs_key)
if [ "${VSNAP_GUEST_REFRESH:-0}" != 1 ] && up_to_date "$KEY"; then
    say "up to date: $OUT ($(sed -n 's/^versions=//p' "$OUT/stamp"))"
    exit 0
fi

mkdir -p "$OUT" "$CACHE/debs" "$CACHE/roots"
exec 9>"$OUT/.lock"
flock 9 # one build at a time; a second caller waits, then finds it done
if [ "${VSNAP_GUEST_REFRESH:-0}" != 1 ] && up_to_date "$KEY"; then
    say "up to date: $OUT (built by a concurrent run)"
    exit 0
fi

for t in apt-get apt-cache dpkg-deb python3 cargo sha256sum flock; do
    command -v "$t" >/dev/null || die "$t not found"
done

# ---- resolve the package set and its exact versions
# From the dependency tree: the kernel image the metapackage points at,
# busybox-static, qemu-guest-agent and the shared-library packages below it
# (lib*, reached only through lib* packages; the NEEDED walk in
# mkinitramfs.py later takes exactly the libraries the agent loads).
read -r -d '' PICK <<'EOF' || true
import sys
flavour = sys.argv[1]
deps, cur = {}, None
for line in sys.stdin:
    if not line.startswith(" "):
        cur = line.strip()
        deps.setdefault(cur, [])
    elif cur and line.strip().split(":")[0].lstrip("|") in ("Depends", "PreDepends"):
        dep = line.split(":", 1)[1].strip()
        if not dep.startswith("<"):  # skip virtual packages
            deps[cur].append(dep)
meta = f"linux-image-{flavour}"
kernels = [d for d in deps.get(meta, []) if d.startswith("linux-image-") and d != meta]
if len(kernels) != 1 or "qemu-guest-agent" not in deps or "busybox-static" not in deps:
    sys.exit(1)
out, todo = set(), ["qemu-guest-agent"]
while todo:
    p = todo.pop()
    if p in out:
        continue
    out.add(p)
    todo += [d for d in deps.get(p, []) if d.startswith("lib") and "perl" not in d]
print(kernels[0])
print("busybox-static")
for p in sorted(out):
    print(p)
EOF

declare -A DEB=()
PKGS=() VERSIONS=()
resolve() { # sets PKGS (kernel first), DEB[pkg]="file sha256 version", VERSIONS
    local graph uris empty _url file _size hash pkg ver p
    graph=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances \
        "linux-image-$FLAVOUR" busybox-static qemu-guest-agent 2>/dev/null) || return 1
    mapfile -t PKGS < <(python3 -c "$PICK" "$FLAVOUR" <<<"$graph")
    [ "${#PKGS[@]}" -ge 4 ] || return 1
    # Exact versions and files, as apt-get would download them now.
    empty=$CACHE/empty
    rm -rf "$empty" && mkdir -p "$empty"
    uris=$(cd "$empty" && apt-get download --print-uris "${PKGS[@]}" 2>/dev/null) || return 1
    rmdir "$empty"
    DEB=() VERSIONS=()
    while read -r _url file _size hash; do
        [ -n "$file" ] || continue
        pkg=${file%%_*}
        ver=${file#*_} && ver=${ver%_*} && ver=${ver//%3a/:}
        DEB[$pkg]="$file ${hash#SHA256:} $ver"
        VERSIONS+=("$pkg=$ver")
    done <<<"$uris"
    for p in "${PKGS[@]}"; do [ -n "${DEB[$p]:-}" ] || return 1; done
    mapfile -t VERSIONS < <(printf '%s\n' "${VERSIONS[@]}" | sort)
}

fetch() { # download what is not cached (checked against apt's SHA256); sets ROOTS
    local p file hash ver deb root
    ROOTS=()
    for p in "${PKGS[@]}"; do
        read -r file hash ver <<<"${DEB[$p]}"
        deb=$CACHE/debs/$file
        if ! [ -s "$deb" ] || [ "$(sha256sum "$deb" | cut -d' ' -f1)" != "$hash" ]; then
            say "downloading $file"
            rm -f "$deb"
            (cd "$CACHE/debs" && apt-get download -q -o APT::Sandbox::User=root "$p=$ver" >/dev/null) || return 1
            # apt names the file itself; make sure it is the one expected.
            [ -s "$deb" ] || die "expected $deb after apt-get download"
            [ "$(sha256sum "$deb" | cut -d' ' -f1)" = "$hash" ] || die "$file: SHA256 mismatch"
        fi
        root=$CACHE/roots/${file%.deb}
        if ! [ -e "$root/.unpacked" ]; then
            say "unpacking $file"
            rm -rf "$root"
            dpkg-deb -x "$deb" "$root"
            touch "$root/.unpacked"
        fi
        ROOTS+=("$root")
    done
}

# A fresh machine has no package lists, and old lists name files the mirror
# no longer has: either way, apt-get update once and try again.
if ! resolve; then
    say "apt does not know the packages: apt-get update"
    apt-get update -qq || die "apt-get update failed"
    resolve || die "cannot resolve linux-image-$FLAVOUR, busybox-static, qemu-guest-agent with apt"
fi
KPKG=${PKGS[0]}
RUSTC=$(rustc --version 2>/dev/null || echo unknown)
BUILD_KEY=$( { echo "$KEY"; printf '%s\n' "${VERSIONS[@]}"; echo "$RUSTC"; } | sha256sum | cut -c1-16)
short_versions() { printf '%s\n' "${VERSIONS[@]}" | grep -E '^(linux-image|busybox-static|qemu-guest-agent)' | tr '\n' ' ' | sed 's/ $//'; }

if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] && grep -qx "build=$BUILD_KEY" "$OUT/stamp" 2>/dev/null; then
    sed -i "s/^inputs=.*/inputs=$KEY/" "$OUT/stamp"
    say "up to date: $OUT (package versions unchanged)"
    exit 0
fi

if ! fetch; then
    say "download failed: apt-get update and try again"
    apt-get update -qq || die "apt-get update failed"
    resolve || die "cannot resolve the packages after apt-get update"
    fetch || die "apt-get download failed"
fi
# Drop cached versions no longer used (old kernels are large).
for r in "$CACHE"/roots/*; do
    keep=0
    for k in "${ROOTS[@]}"; do [ "$r" = "$k" ] && keep=1; done
    [ $keep = 1 ] || { say "removing old $(basename "$r")"; rm -rf "$r" "$CACHE/debs/$(basename "$r").deb"; }
done

KROOT=${ROOTS[0]}
KVER=${KPKG#linux-image-}
[ -s "$KROOT/boot/vmlinuz-$KVER" ] || die "no boot/vmlinuz-$KVER in $KPKG"
[ -d "$KROOT/lib/modules/$KVER" ] || die "no lib/modules/$KVER in $KPKG"

# ---- the writer: a static Rust program (standalone crate, std only)
say "building the writer ($RUSTC)"
(
    cd "$HERE/writer"
    unset CARGO_ENCODED_RUSTFLAGS RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER
    export CARGO_TARGET_DIR=$CACHE/writer-target
    export RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$HERE/writer=/vsnap-guest-writer"
    nice cargo build -q --release --locked --offline --target x86_64-unknown-linux-gnu
) || die "cargo build of guest/writer failed"
WRITER=$CACHE/writer-target/x86_64-unknown-linux-gnu/release/vsnap-guest-writer

# ---- initramfs
root_of() { for r in "${ROOTS[@]}"; do case "$(basename "$r")" in "$1"_*) echo "$r"; return ;; esac; done; }
BB=$(root_of busybox-static)/bin/busybox
QGA=$(root_of qemu-guest-agent)/usr/sbin/qemu-ga
[ -x "$BB" ] || die "no bin/busybox in busybox-static"
[ -x "$QGA" ] || die "no usr/sbin/qemu-ga in qemu-guest-agent"

rootargs=()
for r in "${ROOTS[@]:1}"; do rootargs+=(--root "$r"); done
modargs=()
for m in "${MODULES[@]}"; do modargs+=(--module "$m"); done
say "packing the initramfs"
python3 "$HERE/mkinitramfs.py" --out "$OUT/initrd.img.new" "${rootargs[@]}" \
    --modules-dir "$KROOT/lib/modules/$KVER" "${modargs[@]}" \
    --busybox "$BB" \
    --elf "$QGA:usr/sbin/qemu-ga" \
    --elf "$WRITER:usr/bin/vsnap-writer" \
    --file "$HERE/init:init" \
    --file "$HERE/shutdown:sbin/shutdown" \
    --manifest "$OUT/contents.txt.new" --compress "$COMPRESS"
cp "$KROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz.new"

{
    echo "# vsnap test guest, built by guest/build.sh"
    echo "kernel: $KVER"
    echo "rustc: $RUSTC"
    echo "packages:"
    printf '  %s\n' "${VERSIONS[@]}"
    echo "contents:"
    sed 's/^/  /' "$OUT/contents.txt.new"
    echo "sha256:"
    (cd "$OUT" && sha256sum vmlinuz.new initrd.img.new | sed 's/\.new$//; s/^/  /')
} >"$OUT/manifest.txt.new"
rm -f "$OUT/contents.txt.new"
mv -f "$OUT/vmlinuz.new" "$OUT/vmlinuz"
mv -f "$OUT/initrd.img.new" "$OUT/initrd.img"
mv -f "$OUT/manifest.txt.new" "$OUT/manifest.txt"
printf 'inputs=%s\nbuild=%s\nversions=%s\n' "$KEY" "$BUILD_KEY" "$(short_versions)" >"$OUT/stamp"
say "built $OUT/vmlinuz ($(stat -c %s "$OUT/vmlinuz") bytes) and $OUT/initrd.img ($(stat -c %s "$OUT/initrd.img") bytes): $(short_versions)"
