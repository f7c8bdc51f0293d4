#!/usr/bin/env bash
# Smoke test of the vsnap test guest: build (cached), boot it with three
# disks (vda raw, vdb and vdc qcow2), wait for VSNAP-GUEST-READY, talk to
# the real guest agent (ping, fsfreeze freeze/status/thaw), check that a
# frozen guest's filesystem is clean and its writer stalls, quit QEMU over
# QMP, and read the writer's sequence numbers back from the images.
#
#   guest/smoke.sh            (VSNAP_SMOKE_KEEP=1 keeps the work dir;
#                              VSNAP_SMOKE_TIMEOUT=S boot timeout, default 60)
# Exit 0 when every check passed. Needs: qemu-system-x86_64, qemu-img,
# mkfs.ext4, debugfs, e2fsck, python3.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=$(command -v /usr/bin/python3 || command -v python3) # not a slow pyenv shim
CTL="$PY $HERE/guestctl.py"
TIMEOUT=${VSNAP_SMOKE_TIMEOUT:-60}

say() { printf 'smoke: %s\n' "$*"; }
fail() { printf 'smoke: FAIL: %s\n' "$*" >&2; [ -n "${W:-}" ] && [ -f "$W/console.log" ] && sed 's/^/  console| /' "$W/console.log" >&2; exit 1; }
now() { date +%s.%N; }
secs() { $PY -c "print(f'{$2 - $1:.2f}')"; }

"$HERE/build.sh"

W=$(mktemp -d /tmp/vsnap-smoke.XXXXXX)
cleanup() {
    if [ -n "${PID:-}" ] && kill -0 "$PID" 2>/dev/null; then
        kill "$PID" 2>/dev/null || true
    fi
    if [ "${VSNAP_SMOKE_KEEP:-0}" = 1 ]; then say "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT

# Disks: ext4 made on the host (the guest formats nothing), 64 MiB each.
for d in vda vdb vdc; do
    truncate -s 64M "$W/$d.raw"
    mkfs.ext4 -q -F -L "$d" "$W/$d.raw"
done
for d in vdb vdc; do
    qemu-img convert -q -f raw -O qcow2 "$W/$d.raw" "$W/$d.qcow2"
    rm "$W/$d.raw"
done
IMAGES=("$W/vda.raw" "$W/vdb.qcow2" "$W/vdc.qcow2")

seqs() { # the highest seq on each image, space separated, in disk order
    local out=()
    for i in "${IMAGES[@]}"; do
        out+=("$($CTL image-seq "$i" | python3 -c 'import json,sys; print(json.load(sys.stdin)["seq"])')")
    done
    echo "${out[*]}"
}
consistent() { # seqs in disk order: non-increasing, spread at most 1
    python3 -c '
import sys
s = [int(x) for x in sys.argv[1:]]
ok = all(a >= b for a, b in zip(s, s[1:])) and s[0] - s[-1] <= 1 and s[-1] > 0
sys.exit(0 if ok else 1)' "$@"
}

T0=$(now)
"$HERE/run.sh" -d "$W" "${IMAGES[@]}" >/dev/null
PID=$(cat "$W/qemu.pid") # QEMU removes its pid file when it exits
say "qemu started ($(grep -o 'accel=[a-z]*' "$W/cmdline")), pid $PID"
$CTL wait-ready "$W/console.log" "$TIMEOUT" >/dev/null || fail "guest not ready"
T_READY=$(now)
ping=$($CTL qga "$W/qga.sock" guest-ping) || fail "guest-ping failed"
T_AGENT=$(now)
[ "$ping" = '{"return": {}}' ] || fail "guest-ping answered $ping"
say "$(grep VSNAP-GUEST-READY "$W/console.log")"
say "boot to VSNAP-GUEST-READY: $(secs "$T0" "$T_READY") s; to a guest-ping reply: $(secs "$T0" "$T_AGENT") s"

version=$($CTL qmp "$W/qmp.sock" query-version | python3 -c 'import json,sys; v=json.load(sys.stdin)["return"]["qemu"]; print("%d.%d.%d" % (v["major"], v["minor"], v["micro"]))')
say "QMP: qemu $version"
agentver=$($CTL qga "$W/qga.sock" guest-info | python3 -c 'import json,sys; print(json.load(sys.stdin)["return"]["version"])')
say "agent: qemu-ga $agentver"

# Let the writer make progress, then freeze.
sleep 1
out=$($CTL qga "$W/qga.sock" guest-fsfreeze-status guest-fsfreeze-freeze guest-fsfreeze-status)
say "freeze: $(echo $out)"
[ "$(sed -n 1p <<<"$out")" = '{"return": "thawed"}' ] || fail "status before freeze: $out"
[ "$(sed -n 2p <<<"$out")" = '{"return": 3}' ] || fail "freeze did not freeze 3 filesystems: $out"
[ "$(sed -n 3p <<<"$out")" = '{"return": "frozen"}' ] || fail "status after freeze: $out"

# Frozen: the writer is stalled and the images show one instant, cleanly.
s1=$(seqs); sleep 1; s2=$(seqs)
say "seq while frozen: $s1, 1 s later: $s2"
[ "$s1" = "$s2" ] || fail "writer progressed while frozen"
consistent $s1 || fail "frozen images disagree: $s1"
cp --sparse=always "$W/vda.raw" "$W/frozen-vda.raw"
qemu-img convert -U -q -f qcow2 -O raw "$W/vdb.qcow2" "$W/frozen-vdb.raw"
for f in frozen-vda frozen-vdb; do
    e2fsck -fn "$W/$f.raw" >"$W/$f.fsck" 2>&1 || { cat "$W/$f.fsck" >&2; fail "e2fsck -fn of the frozen $f is not clean"; }
done
say "e2fsck -fn on copies of the frozen vda and vdb: clean"

out=$($CTL qga "$W/qga.sock" guest-fsfreeze-thaw guest-fsfreeze-status)
say "thaw: $(echo $out)"
[ "$(sed -n 1p <<<"$out")" = '{"return": 3}' ] || fail "thaw: $out"
[ "$(sed -n 2p <<<"$out")" = '{"return": "thawed"}' ] || fail "status after thaw: $out"
sleep 1
s3=$(seqs) # read one image after another while the writer runs: only vda counts
say "seq 1 s after thaw: $s3 (read live, one image after another)"
read -r a _ <<<"$s2"
read -r b _ <<<"$s3"
[ "$b" -gt "$a" ] || fail "writer did not resume after thaw"

# Quit over QMP; QEMU must exit.
$CTL qmp "$W/qmp.sock" quit >/dev/null || fail "QMP quit failed"
for _ in $(seq 200); do kill -0 "$PID" 2>/dev/null || break; sleep 0.05; done
kill -0 "$PID" 2>/dev/null && fail "QEMU still running 10 s after quit"
say "QEMU quit"

final=$(seqs)
say "final seq per disk (vda vdb vdc): $final"
for i in "${IMAGES[@]}"; do say "  $(basename "$i"): $($CTL image-seq "$i")"; done
consistent $final || fail "final images not consistent: $final"
say "PASS"
