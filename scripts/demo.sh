#!/usr/bin/env bash
# A guided tour of vsnap on two small qcow2 images, with two real crashes
# (SIGKILL at named crash points) and their recovery, then a running guest
# (scripts/demo-live.sh). As root on Debian 12; installs what is missing
# (setup.sh); safe to run twice. Everything happens in fresh directories
# under /var/tmp with their own --state-dir; the host's /var/lib/vsnap is
# not touched. Exit status non-zero if any check fails.
#
#   a.qcow2  internal snapshots (inside the qcow2 file)
#   b.qcow2  external snapshots (overlay chains)
# vsnap keeps the families apart: one volume has internal or external
# snapshots, never both.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin:/root/.cargo/bin"

step_no=0
say() { step_no=$((step_no + 1)); printf '\n\033[1m[%d] %s\033[0m\n' "$step_no" "$*"; }
[ -t 1 ] || say() { step_no=$((step_no + 1)); printf '\n[%d] %s\n' "$step_no" "$*"; }
# show CMD...: the command as one would type it (arguments with spaces quoted).
show() {
    local a out=""
    for a in "$@"; do
        case $a in *[[:space:]]*) out+=" '$a'" ;; *) out+=" $a" ;; esac
    done
    printf '  $%s\n' "$out"
}
# run CMD...: show it, run it, indent its output; returns its exit status.
run() { show "$@"; "$@" 2>&1 | sed 's/^/    /'; return "${PIPESTATUS[0]}"; }
fail() { printf '\nDEMO FAILED: %s\n' "$*" >&2; exit 1; }
trap 'printf "\nDEMO FAILED: command at line %s exited %s\n" "$LINENO" "$?" >&2' ERR
ok() { printf '  -> OK: %s\n' "$*"; }

say "Installing what is missing (scripts/setup.sh)"
scripts/setup.sh

D=$(mktemp -d /var/tmp/vsnap-demo.XXXXXX)
trap 'rm -f "$D/vsnap" "$D/vsnap-recover"; printf "\n(the demo directory %s is left for you to look at; rm -rf it when done)\n" "$D"' EXIT

say "Building vsnap and vsnap-recover with crash points compiled in (--features vsnap-cli/failpoints)"
# Private copies in the demo directory: another build sharing target/ (one
# without crash points) cannot swap the binaries under the demo. Checked:
# opening a journal must log the crash point journal.opened.
BIN=$D
for attempt in 1 2 3; do
    cargo build -p vsnap-cli --features vsnap-cli/failpoints
    cp target/debug/vsnap target/debug/vsnap-recover "$D/"
    rm -rf "$D/probe" "$D/probe.log"
    VSNAP_FAILPOINT_LOG=$D/probe.log "$BIN/vsnap" --state-dir "$D/probe" plan list >/dev/null
    if grep -qx journal.opened "$D/probe.log" 2>/dev/null; then break; fi
    [ "$attempt" -lt 3 ] || fail "target/debug/vsnap has no crash points even after a build with --features vsnap-cli/failpoints (is another build overwriting target/ right now?)"
    echo "  (the copied binary had no crash points: another build replaced it; building again)"
done
rm -rf "$D/probe" "$D/probe.log"
ok "vsnap and vsnap-recover copied to $D, crash points compiled in"
T0=$(date +%s)
export VSNAP_STATE_DIR=$D/state   # the same as --state-dir "$D/state" on every command
cd "$D"
vsnap() { "$BIN/vsnap" "$@"; }
vsnap-recover() { "$BIN/vsnap-recover" "$@"; }
echo "  demo directory: $D   state directory (journal + catalog): $VSNAP_STATE_DIR"

# expect_pattern IMAGE OFFSET LEN BYTE: the guest would read BYTE there.
expect_pattern() {
    qemu-io -f qcow2 -r -c "read -P $4 $2 $3" "$1" >/dev/null 2>&1 ||
        fail "$1 does not read $4 at $2+$3"
    ok "$1 reads $4 at offset $2 (length $3)"
}
expect_not_pattern() {
    ! qemu-io -f qcow2 -r -c "read -P $4 $2 $3" "$1" >/dev/null 2>&1 ||
        fail "$1 still reads $4 at $2+$3"
    ok "$1 no longer reads $4 at offset $2"
}
# crash CRASHPOINT CMD...: run a vsnap command that must die at CRASHPOINT.
crash() {
    local point=$1 rc=0
    shift
    show "VSNAP_CRASH_AT=$point" vsnap "$@"
    # (braces: bash's own "Killed" notice goes to /dev/null too)
    { VSNAP_CRASH_AT=$point "$BIN/vsnap" "$@"; } 2>/dev/null || rc=$?
    [ "$rc" -eq 137 ] || fail "vsnap was expected to be SIGKILLed at $point (exit 137), it exited $rc"
    ok "vsnap was killed by SIGKILL at crash point $point (exit $rc): no cleanup, no flush"
}
# (`.vsnap-owner.*` is an image's ownership claim, kept beside it on
# purpose: not a temporary.)
temp_files() { find "$D" -maxdepth 1 -name '.vsnap-*' ! -name '.vsnap-owner.*' -printf '%f\n'; }

#############################################################################
printf '\n=== Part 1: internal snapshots on a.qcow2 ===\n'

say "Create a 64 MiB qcow2 image a.qcow2 and write 1 MiB of 0x11 at offset 0"
run qemu-img create -f qcow2 a.qcow2 64M
run qemu-io -f qcow2 -c 'write -P 0x11 0 1M' a.qcow2

say "Take internal snapshot 'before-upgrade' (stored inside a.qcow2)"
run vsnap vol snapshot create a.qcow2 before-upgrade --kind internal --description "state before the upgrade"
run qemu-img snapshot -l a.qcow2

say "The 'upgrade' overwrites the data with 0x22"
run qemu-io -f qcow2 -c 'write -P 0x22 0 1M' a.qcow2
expect_pattern a.qcow2 0 1M 0x22

say "Take internal snapshot 'upgraded', and kill vsnap right after qemu-img made it, before vsnap recorded that (crash point run.applied.0)"
run vsnap vol snapshot create a.qcow2 upgraded --dry-run
crash run.applied.0 vol snapshot create a.qcow2 upgraded

say "Leftover state: an UNFINISHED plan, and a snapshot 'upgraded' inside a.qcow2 that the catalog does not have"
run vsnap plan list
vsnap plan list | grep -q UNFINISHED || fail "no UNFINISHED plan in the journal"
run qemu-img snapshot -l a.qcow2
qemu-img snapshot -l a.qcow2 | grep -q upgraded || fail "qemu-img did not make 'upgraded' before the crash"
ok "'upgraded' is in the image, not in the catalog"

say "vsnap-recover decides from the journal: the pivot (the catalog commit) never started, so it rolls BACK"
out=$(vsnap-recover) || fail "vsnap-recover exited $?"
printf '    %s\n' "$out"
grep -q 'rolled-back' <<<"$out" || fail "expected the plan to be rolled back"
run qemu-img snapshot -l a.qcow2
! qemu-img snapshot -l a.qcow2 | grep -q upgraded || fail "'upgraded' still inside a.qcow2 after the roll-back"
ok "the half-made snapshot is gone from a.qcow2"
run vsnap-recover
ok "a second run has nothing to do"

say "Take 'upgraded' again, without a crash this time"
run vsnap vol snapshot create a.qcow2 upgraded || fail "create failed"

say "Check a.qcow2 against the catalog, and qemu-img check it"
run vsnap vol check a.qcow2 || fail "vsnap vol check a.qcow2 found problems"
run qemu-img check a.qcow2 || fail "qemu-img check a.qcow2 failed"

say "Revert a.qcow2 to 'before-upgrade': the 0x22 written since is discarded"
run vsnap vol snapshot revert a.qcow2 before-upgrade || fail "revert failed"
expect_pattern a.qcow2 0 1M 0x11
run vsnap vol snapshot current a.qcow2
run vsnap vol snapshot list a.qcow2

#############################################################################
printf '\n=== Part 2: external snapshots on b.qcow2 ===\n'

say "Create a 64 MiB qcow2 image b.qcow2; write 0x11 over its first MiB"
run qemu-img create -f qcow2 b.qcow2 64M
run qemu-io -f qcow2 -c 'write -P 0x11 0 1M' b.qcow2

say "External snapshot 's1': b.qcow2's state is frozen as b.s1.qcow2, and a new overlay takes the path b.qcow2"
run vsnap vol snapshot create b.qcow2 s1 --kind external

say "Write 0x22 over the first MiB and 0x2a over the second"
run qemu-io -f qcow2 -c 'write -P 0x22 0 1M' -c 'write -P 0x2a 1M 1M' b.qcow2

say "External snapshot 's2' (the kind is now taken from the volume's snapshots)"
run vsnap vol snapshot create b.qcow2 s2
run qemu-img info --backing-chain b.qcow2

say "Write more: 0x33 over the first MiB (after s2)"
run qemu-io -f qcow2 -c 'write -P 0x33 0 1M' b.qcow2

say "Start external snapshot 's3', and kill vsnap right after its pivot (the rename that puts the new overlay at b.qcow2), before the pivot is recorded (crash point run.applied.1)"
run vsnap vol snapshot create b.qcow2 s3 --dry-run
crash run.applied.1 vol snapshot create b.qcow2 s3

say "Leftover state: an UNFINISHED plan; b.s3.qcow2 holds the frozen state and b.qcow2 is already the new overlay"
run vsnap plan list
vsnap plan list | grep -q UNFINISHED || fail "no UNFINISHED plan in the journal"
run qemu-img info --backing-chain b.qcow2

say "vsnap-recover: the journal cannot tell whether the pivot happened, so it probes it: it did, so it rolls FORWARD"
out=$(vsnap-recover) || fail "vsnap-recover exited $?"
printf '    %s\n' "$out"
grep -q 'committed' <<<"$out" || fail "expected the plan to be rolled forward (committed)"
[ -z "$(temp_files)" ] || fail "temporary files left after recovery: $(temp_files)"
[ -e b.s3.qcow2 ] || fail "b.s3.qcow2 missing after recovery"
run vsnap vol snapshot current b.qcow2
vsnap vol snapshot current b.qcow2 | grep -q s3 || fail "s3 is not the current snapshot after recovery"
ok "snapshot 's3' completed by recovery; no temporary file left"
run vsnap-recover
run vsnap plan list

say "The chain is consistent: vsnap vol check and qemu-img check"
run vsnap vol check b.qcow2 || fail "vsnap vol check b.qcow2 found problems"
run qemu-img check b.qcow2 || fail "qemu-img check b.qcow2 failed"
run qemu-img info --backing-chain b.qcow2
say "Nothing the guest wrote was lost: b.qcow2 still reads 0x33, then 0x2a"
expect_pattern b.qcow2 0 1M 0x33
expect_pattern b.qcow2 1M 1M 0x2a

say "Revert b.qcow2 to 's2': b.qcow2 now shows exactly what was written before s2"
run vsnap vol snapshot revert b.qcow2 s2 || fail "revert failed"
expect_pattern b.qcow2 0 1M 0x22
expect_pattern b.qcow2 1M 1M 0x2a
expect_not_pattern b.qcow2 0 1M 0x33
run vsnap vol check b.qcow2 || fail "vsnap vol check b.qcow2 found problems"
say "The snapshot tree of b.qcow2 and its current snapshot"
run vsnap vol snapshot list --tree b.qcow2
run vsnap vol snapshot info b.qcow2 s2

say "Families do not mix: an internal snapshot of b.qcow2 is refused (exit 2, nothing changed)"
rc=0
run vsnap vol snapshot create b.qcow2 inner --kind internal || rc=$?
[ "$rc" -eq 2 ] || fail "expected exit 2, got $rc"
ok "refused with exit 2"

#############################################################################
printf '\n=== Part 3: a running guest (scripts/demo-live.sh) ===\n'
# The real test guest, a live quiesced snapshot while it writes, a crash,
# recovery. Same binaries; its own directory and state directory.
DEMO_STEP=$step_no "$ROOT/scripts/demo-live.sh" "$BIN" || fail "the live part failed"

printf '\nDEMO PASSED: every check held (%ss after the build).\n' "$(( $(date +%s) - T0 ))"
