#!/usr/bin/env bash
# vsnap's benchmarks. As root on Debian 12; installs what is missing.
#
#   1. cargo bench -p vsnap-cli --bench create
#        whole-process `vsnap vol snapshot create` (internal, external)
#        against the bare qemu-img command each wraps; p50/p90 and the
#        ratio vsnap/floor (target <= 1.5x). cargo builds the release
#        vsnap (target/release/vsnap) for it.
#   2. cargo bench -p vsnap-journal
#        the journal's own benchmarks (group commit), if the crate has any.
#
# Environment for the create bench: VSNAP_BENCH_ITERS (default 40),
# VSNAP_BENCH_WARMUP (default 5), VSNAP_BENCH_DIR (default /var/tmp).
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin:/root/.cargo/bin"

scripts/setup.sh
status=0

printf '\n==== cargo bench -p vsnap-cli --bench create ====\n'
cargo bench -p vsnap-cli --bench create || status=1
printf '\n==== cargo bench -p vsnap-cli --bench pause ====\n'; cargo bench -p vsnap-cli --bench pause || status=1  # live snapshot pause window vs its QMP floor, test guest, 1/4/16 disks

printf '\n==== cargo bench -p vsnap-journal ====\n'
if compgen -G 'journal/benches/*.rs' >/dev/null || grep -q '^\[\[bench\]\]' journal/Cargo.toml; then
    cargo bench -p vsnap-journal || status=1
else
    echo "bench: the journal has no benchmark yet (no journal/benches/, no [[bench]] in journal/Cargo.toml): skipped"
fi
exit "$status"
