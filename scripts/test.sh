#!/usr/bin/env bash
# vsnap's whole test suite: what CI runs (.ci/run), and the README's test
# command. As root on Debian 12; installs what is missing (setup.sh); safe
# to run twice.
#
#   1. scripts/setup.sh                       Debian packages, cargo
#   2. cargo build  --workspace --features vsnap-cli/failpoints
#   3. cargo test   --workspace --features vsnap-cli/failpoints --no-fail-fast
#        unit and integration tests of every crate, the journal torture test
#        and the crash suite (harness = false: they print their own summary
#        lines, repeated at the end)
#   4. the loom model of the journal's group commit (command from the top
#      comment of journal/src/group.rs), in its own target dir target/loom
#
# Every phase runs even if an earlier test phase failed (a build failure
# stops the run); the exit status is 0 only if every phase passed.
# A hung test cannot eat CI's 90 minutes: the whole run has a budget
# (VSNAP_TEST_BUDGET_MIN, default 80 minutes); a phase still running when it
# is spent is killed (with its whole process group) and reported TIMED OUT.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin:/root/.cargo/bin"
LOG_DIR=${VSNAP_TEST_LOG_DIR:-$ROOT/target/test-logs}
mkdir -p "$LOG_DIR"
rm -f "$LOG_DIR"/setup.log "$LOG_DIR"/build.log "$LOG_DIR"/test.log "$LOG_DIR"/loom.log

T0=$(date +%s)
DEADLINE=$(( T0 + ${VSNAP_TEST_BUDGET_MIN:-80} * 60 ))
declare -a NAMES=() RESULTS=() SECS=()
failed=0

banner() { printf '\n==== %s ====\n' "$*"; }

# phase NAME LOGFILE CMD...: run, tee the output to LOGFILE, record result.
phase() {
    local name=$1 log=$2
    shift 2
    banner "$name: $*"
    local t=$(date +%s) rc=0
    local left=$(( DEADLINE - t ))
    [ "$left" -gt 0 ] || left=1
    # timeout(1) signals the command's whole process group, test binaries too.
    timeout --kill-after=30 "$left" "$@" 2>&1 | tee "$log" || rc=$?
    NAMES+=("$name")
    SECS+=($(( $(date +%s) - t )))
    if [ "$rc" -eq 0 ]; then
        RESULTS+=(ok)
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        RESULTS+=("TIMED OUT")
        echo "test.sh: $name killed: the run's budget of ${VSNAP_TEST_BUDGET_MIN:-80} minutes is spent" >&2
        failed=1
    else
        RESULTS+=("FAILED (exit $rc)")
        failed=1
    fi
    return "$rc"
}

summary() {
    banner "vsnap test summary"
    local i
    for i in "${!NAMES[@]}"; do
        printf '%-12s %-18s %5ss\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECS[$i]}"
    done
    if [ -f "$LOG_DIR/test.log" ]; then
        # Sum libtest's per-target lines "test result: ok. P passed; F failed; I ignored; ...".
        awk '/^test result:/ { for (k = 1; k <= NF; k++) { if ($k ~ /^passed/) p += $(k-1); if ($k ~ /^failed/) f += $(k-1); if ($k ~ /^ignored/) ig += $(k-1) } n++ }
             END { printf "cargo test:  %d test targets, %d passed, %d failed, %d ignored\n", n, p, f, ig }' "$LOG_DIR/test.log"
        # cargo's own list of failed targets (--no-fail-fast), if any.
        sed -n '/^error: [0-9]* targets\{0,1\} failed:/,/^$/p' "$LOG_DIR/test.log" | grep -E '^ +`' | sed 's/^ */failed:      /' || true
        local torture crash
        torture=$(grep -E '^kills: [0-9]+' "$LOG_DIR/test.log" || true)
        crash=$(grep -E '^crash points explored: [0-9]+' "$LOG_DIR/test.log" || true)
        live=$(grep -E '^live crash points explored: [0-9]+' "$LOG_DIR/test.log" || true)
        revert=$(grep -E '^revert crash suite: [0-9]+' "$LOG_DIR/test.log" || true)
        short=$(grep -E '^short-lived writers: ' "$LOG_DIR/test.log" || true)
        printf 'torture:     %s\n' "${torture:-no summary line seen (journal torture test absent?)}"
        printf 'short-lived: %s\n' "${short:-no summary line seen (journal short_lived test absent?)}"
        printf 'crash suite: %s\n' "${crash:-no summary line seen (crash suite absent?)}"
        printf 'live crash:  %s\n' "${live:-no summary line seen (live crash suite absent?)}"
        printf 'revert:      %s\n' "${revert:-no summary line seen (revert crash suite absent?)}"
    fi
    if [ -f "$LOG_DIR/loom.log" ]; then
        printf 'loom:        %s\n' "$(grep -E '^test result:' "$LOG_DIR/loom.log" | tail -n1 || echo 'no result line')"
    fi
    printf 'total time:  %ss (logs in %s)\n' "$(( $(date +%s) - T0 ))" "$LOG_DIR"
    if [ "$failed" -eq 0 ]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
}
trap summary EXIT

phase setup "$LOG_DIR/setup.log" scripts/setup.sh
phase build "$LOG_DIR/build.log" cargo build --workspace --features vsnap-cli/failpoints
phase test "$LOG_DIR/test.log" cargo test --workspace --features vsnap-cli/failpoints --no-fail-fast || true
# The loom command, as journal/src/group.rs documents it.
phase loom "$LOG_DIR/loom.log" env RUSTFLAGS="--cfg loom" \
    cargo test -p vsnap-journal --release --target-dir target/loom --lib loom || true

exit "$failed"
