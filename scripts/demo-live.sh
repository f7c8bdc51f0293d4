#!/usr/bin/env bash
# The live part of the demo (scripts/demo.sh runs it last; it also runs on
# its own): boots the real test guest (guest/, a Debian kernel, busybox,
# the real qemu-guest-agent and a writer that keeps writing increasing
# sequence numbers to every disk), takes a live quiesced snapshot of two of
# its three disks while the writer runs, kills vsnap in the middle of a
# second one, recovers, and shows the guest running, thawed, and the chains
# consistent. As root on Debian 12; installs what is missing; exit status
# non-zero if any check fails.
#
# Usage: scripts/demo-live.sh [BIN_DIR]   (BIN_DIR: vsnap built with crash points)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin:/root/.cargo/bin"
PY=$(command -v /usr/bin/python3 || command -v python3)
step_no=${DEMO_STEP:-0}
say() { step_no=$((step_no + 1)); printf '\n[%d] %s\n' "$step_no" "$*"; }
show() { printf '  $ %s\n' "$*"; }
run() { show "$@"; "$@" 2>&1 | sed 's/^/    /'; return "${PIPESTATUS[0]}"; }
fail() { printf '\nLIVE DEMO FAILED: %s\n' "$*" >&2; exit 1; }
ok() { printf '  -> OK: %s\n' "$*"; }

D=$(mktemp -d /var/tmp/vsnap-demo-live.XXXXXX)
BIN=${1:-}
if [ -z "$BIN" ]; then
    [ "${DEMO_SKIP_SETUP:-}" = 1 ] || scripts/setup.sh
    cargo build -q -p vsnap-cli --features vsnap-cli/failpoints
    cp target/debug/vsnap target/debug/vsnap-recover "$D/"
    BIN=$D
fi
vsnap() { "$BIN/vsnap" "$@"; }
vsnap-recover() { "$BIN/vsnap-recover" "$@"; }
export VSNAP_STATE_DIR=$D/state
G=$D/guest
cleanup() {
    if [ -f "$G/qemu.pid" ]; then kill -9 "$(cat "$G/qemu.pid")" 2>/dev/null || true; fi
    # A QEMU vsnap started (the revert below): `PID START-TIME`.
    if [ -f "$D/state/run/demo.pid" ]; then kill -9 "$(cut -d' ' -f1 "$D/state/run/demo.pid")" 2>/dev/null || true; fi
    printf "\n(the live demo directory %s is left for you to look at; rm -rf it when done)\n" "$D"
}
trap cleanup EXIT
qga() { "$PY" "$ROOT/guest/guestctl.py" qga "$G/qga.sock" "$@"; }
qmp() { "$PY" "$ROOT/guest/guestctl.py" qmp "$G/qmp.sock" "$@"; }
seq_of() { "$PY" "$ROOT/guest/guestctl.py" image-seq "$1" | "$PY" -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["seq"])'; }

say "Build the test guest from Debian packages (cached after the first time): guest/build.sh"
guest/build.sh
ok "kernel and initramfs in target/guest"

say "Three ext4 disks vda, vdb, vdc (qcow2), and boot the guest under QEMU (TCG)"
for d in vda vdb vdc; do
    truncate -s 64M "$D/$d.raw"
    mkfs.ext4 -q -F "$D/$d.raw"
    qemu-img convert -O qcow2 "$D/$d.raw" "$D/$d.qcow2"
    rm "$D/$d.raw"
done
guest/run.sh -d "$G" "$D/vda.qcow2" "$D/vdb.qcow2" "$D/vdc.qcow2" >/dev/null
secs=$("$PY" guest/guestctl.py wait-ready "$G/console.log" 120) || fail "the guest did not come up"
ok "guest ready after ${secs}s: its agent answers and its writer writes seq numbers to vda, vdb, vdc in turn"

say "Attach vsnap to the running QEMU (its disks are what query-block reports)"
run vsnap domain attach demo --qmp "$G/qmp.sock" --agent "$G/qga.sock"
run vsnap domain info demo

say "Live, quiesced snapshot 'before' of vda and vdb (vdc excluded) while the writer runs"
run vsnap snapshot create demo before --disk-only --quiesce --disk vdc=no --dry-run
run vsnap snapshot create demo before --disk-only --quiesce --disk vdc=no || fail "snapshot failed"
a=$(seq_of "$D/vda.qcow2"); b=$(seq_of "$D/vdb.qcow2")
printf '    frozen state: vda.qcow2 seq=%s, vdb.qcow2 seq=%s\n' "$a" "$b"
[ "$a" -ge "$b" ] && [ "$b" -ge $((a - 1)) ] || fail "the two disks do not show one instant ($a vs $b)"
ok "both snapshotted disks show the same instant"
run qga guest-fsfreeze-status
run vsnap snapshot list demo

say "Second snapshot 'crashy': vsnap is killed with the guest FROZEN, right after the disks switched (crash point run.applied.5, the pivot)"
rc=0
show "VSNAP_CRASH_AT=run.applied.5 vsnap snapshot create demo crashy --disk-only --quiesce --disk vdc=no"
VSNAP_CRASH_AT=run.applied.5 "$BIN/vsnap" snapshot create demo crashy --disk-only --quiesce --disk vdc=no || rc=$?
[ "$rc" -eq 137 ] || fail "expected vsnap to be killed (exit 137), got $rc"
ok "vsnap was killed (SIGKILL)"
run qga guest-fsfreeze-status
run vsnap plan list

say "vsnap-recover: the pivot had happened (query-block shows the overlays), so it rolls FORWARD and thaws"
run vsnap-recover || fail "vsnap-recover failed"
out=$(qga guest-fsfreeze-status)
printf '    %s\n' "$out"
grep -q thawed <<<"$out" || fail "the guest is still frozen"
ok "the guest is thawed"
run qmp query-status
grep -q '"running": true' <(qmp query-status) || fail "the guest is not running"
ok "the guest is running"

say "The guest keeps writing, now into the newest overlays; the chains and the catalog agree"
s1=$(seq_of "$D/vda.crashy.qcow2")
s2=$s1
for _ in $(seq 100); do   # up to ~10 s: the writer writes ~60 rounds a second
    s2=$(seq_of "$D/vda.crashy.qcow2")
    [ "$s2" -gt "$s1" ] && break
done
printf '    vda.crashy.qcow2 seq: %s, then %s\n' "$s1" "$s2"
[ "$s2" -gt "$s1" ] || fail "the writer does not write to the new overlay"
ok "the writer writes to the new overlay"
run vsnap domain check demo || fail "vsnap domain check found problems"
show "qemu-img info -U --backing-chain $D/vda.crashy.qcow2 | grep -E '^image|^backing file:'"
qemu-img info -U --backing-chain "$D/vda.crashy.qcow2" | grep -E '^image|^backing file:' | sed 's/^/    /'
run vsnap snapshot list demo --tree
run vsnap-recover

say "Revert the running guest to 'before': QEMU quits, new overlays on before's frozen files, QEMU started again on them (a fresh boot)"
run vsnap snapshot revert demo before --dry-run
run vsnap snapshot revert demo before || fail "revert failed"
vda_now=$(vsnap --json domain info demo | "$PY" -c 'import json,sys; print([d["source"] for d in json.load(sys.stdin)["disks"] if d["target"]=="vda"][0])')
r=$(seq_of "$vda_now")
printf '    vda now %s: seq=%s (before: %s, crashy: %s)\n' "$(basename "$vda_now")" "$r" "$a" "$s2"
[ "$r" -ge "$a" ] && [ "$r" -lt "$s2" ] || fail "vda is not back at before's instant ($r; before $a, later $s2)"
ok "vda holds before's writes, not the later ones"
grep -q '"running": true' <(qmp query-status) || fail "the guest is not running after the revert"
run vsnap domain check demo || fail "vsnap domain check found problems"
run vsnap snapshot list demo --tree

printf '\nLIVE DEMO PASSED\n'
