#!/usr/bin/env bash
# vsnap's benchmarks. As root on Debian 12; installs what is missing.
#
#   1. cargo bench -p vsnap-cli --bench create
#        whole-process `vsnap vol snapshot create` (internal, external)
#        against the bare qemu-img command each wraps; p50/p90 and the
#        ratio vsnap/floor (target <= 1.5x). cargo builds the release
#        vsnap (target/release/vsnap) for it.
#   2. cargo bench -p vsnap-cli --bench pause
#        the pause window of a live snapshot on the real test guest (1, 4,
#        16 disks) against its QMP floor (stop/transaction/cont).
#   3. cargo bench -p vsnap-journal
#        the journal's own benchmarks (group commit), if the crate has any.
#   4. cargo bench -p vsnap-cli --bench vs_libvirt
#   5. cargo bench -p vsnap-cli --bench revert (volume and domain reverts)
#        a live disk-only snapshot, whole command, vsnap against libvirt's
#        `virsh snapshot-create-as --disk-only --atomic --no-metadata` (1, 4,
#        16 disks; chain depth 1, 20); it runs scripts/libvirt-setup.sh,
#        which installs libvirt and starts libvirtd when needed.
#
# Environment: VSNAP_BENCH_ITERS, VSNAP_BENCH_WARMUP, VSNAP_BENCH_DIR
# (default /var/tmp); see the top comment of each bench for the rest.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin:/root/.cargo/bin"

scripts/setup.sh
status=0

printf '\n==== cargo bench -p vsnap-cli --bench create ====\n'
cargo bench -p vsnap-cli --bench create || status=1

printf '\n==== cargo bench -p vsnap-cli --bench pause ====\n'
cargo bench -p vsnap-cli --bench pause || status=1

printf '\n==== cargo bench -p vsnap-journal ====\n'
if compgen -G 'journal/benches/*.rs' >/dev/null || grep -q '^\[\[bench\]\]' journal/Cargo.toml; then
    cargo bench -p vsnap-journal || status=1
else
    echo "bench: the journal has no benchmark yet (no journal/benches/, no [[bench]] in journal/Cargo.toml): skipped"
fi

printf '\n==== cargo bench -p vsnap-cli --bench vs_libvirt ====\n'
cargo bench -p vsnap-cli --bench vs_libvirt || status=1

printf '\n==== cargo bench -p vsnap-cli --bench revert ====\n'
cargo bench -p vsnap-cli --bench revert || status=1
exit "$status"
