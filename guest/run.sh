#!/usr/bin/env bash
# Boot the vsnap test guest in the background.
#
#   guest/run.sh [-d DIR] [--blockdev] [-m MB] [--append 'ARGS'] [--qmp2] [--incoming URI] DISK...
#
# DISK is PATH or PATH:FORMAT (raw|qcow2; default: qcow2 when the file has
# the qcow2 magic, else raw). Disks become vda, vdb, ... in the order given.
# In DIR (default: a new mktemp dir, printed) it makes:
#   qmp.sock    QMP monitor (unix, server; one client at a time)
#   qmp2.sock   a second QMP monitor, with --qmp2
#   qga.sock    the guest agent's chardev (org.qemu.guest_agent.0)
#   console.log the serial console; "VSNAP-GUEST-READY ..." marks readiness
#   qemu.pid    QEMU's pid
#   cmdline     the exact QEMU command line used
# Disk naming as QMP shows it:
#   default     -drive if=none,id=vdX + -device virtio-blk-pci,drive=vdX,id=vdX-dev
#               (query-block "device" = vdX)
#   --blockdev  -blockdev file node vdX-file, format node vdX + -device
#               virtio-blk-pci,drive=vdX,id=vdX (query-block "device" = "",
#               "qdev" = vdX; node-name vdX)
# Accelerator: TCG unless KVM really works (kvm_works below), or forced with
# VSNAP_GUEST_ACCEL=tcg|kvm. Firmware: qboot when QEMU ships it, or
# VSNAP_GUEST_BIOS=seabios. Guest files: $VSNAP_GUEST_DIR (default
# <repo>/target/guest; run guest/build.sh first).
# Kernel options: console=ttyS0 quiet panic=-1 (a panic ends QEMU, with
# -no-reboot) cryptomgr.notests (skips the crypto self-tests: ~1 s less boot
# under TCG), then --append's.
# --incoming URI: QEMU's -incoming (e.g. 'exec:cat FILE' for a memory state
# vsnap saved with --memory external:FILE): the guest resumes from that
# state instead of booting (same -m and disks as when it was saved).
# Does not wait for the guest: poll console.log for VSNAP-GUEST-READY.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUEST=${VSNAP_GUEST_DIR:-$(dirname "$HERE")/target/guest}

die() { printf 'guest/run: error: %s\n' "$*" >&2; exit 1; }

# KVM is used only where it really works: /dev/kvm usable, hardware
# virtualization in the CPU flags, and not the paravirtual kvm_pvm backend
# (under which a stock guest kernel crawls).
kvm_works() {
    [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
    grep -qwE 'vmx|svm' /proc/cpuinfo || return 1
    [ -d /sys/module/kvm_pvm ] && return 1
    grep -q '^kvm_pvm ' /proc/modules 2>/dev/null && return 1
    return 0
}

accel() {
    case "${VSNAP_GUEST_ACCEL:-auto}" in
    tcg | kvm) echo "$VSNAP_GUEST_ACCEL" ;;
    auto) if kvm_works; then echo kvm; else echo tcg; fi ;;
    *) die "VSNAP_GUEST_ACCEL must be tcg, kvm or auto" ;;
    esac
}

disk_name() { # 0 -> vda, 25 -> vdz, 26 -> vdaa (as Linux names them)
    local i=$1 s=""
    while :; do
        s=$(printf "\\$(printf %03o $((97 + i % 26)))")$s
        i=$((i / 26 - 1))
        [ $i -ge 0 ] || break
    done
    echo "vd$s"
}

DIR="" BLOCKDEV=0 MEM=256 APPEND="" QMP2=0 INCOMING=""
DISKS=()
while [ $# -gt 0 ]; do
    case "$1" in
    -d) DIR=$2; shift 2 ;;
    -m) MEM=$2; shift 2 ;;
    --blockdev) BLOCKDEV=1; shift ;;
    --append) APPEND=$2; shift 2 ;;
    --qmp2) QMP2=1; shift ;;
    --incoming) INCOMING=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) DISKS+=("$1"); shift ;;
    esac
done
[ -s "$GUEST/vmlinuz" ] && [ -s "$GUEST/initrd.img" ] || die "no guest in $GUEST: run guest/build.sh"
[ -n "$DIR" ] || DIR=$(mktemp -d /tmp/vsnap-guest.XXXXXX)
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
rm -f "$DIR/qmp.sock" "$DIR/qmp2.sock" "$DIR/qga.sock" "$DIR/console.log" "$DIR/qemu.pid"

# Firmware: qboot (qemu-system-data's minimal BIOS; it loads the kernel,
# the ACPI tables and nothing else) boots faster than SeaBIOS under TCG.
# VSNAP_GUEST_BIOS=seabios uses QEMU's default instead.
bios_args() {
    local qboot=/usr/share/qemu/qboot.rom
    case "${VSNAP_GUEST_BIOS:-qboot}" in
    qboot) [ -r "$qboot" ] && echo "-bios $qboot" ;;
    *) ;;
    esac
}

ACCEL=$(accel)
case "${VSNAP_GUEST_BIOS:-qboot}" in qboot | seabios) ;; *) die "VSNAP_GUEST_BIOS must be qboot or seabios" ;; esac
read -r -a BIOS <<<"$(bios_args)"
args=(
    qemu-system-x86_64
    -name vsnap-guest
    -machine "q35,accel=$ACCEL"
    -m "$MEM"
    "${BIOS[@]}"
    -nodefaults -display none -no-user-config
    -serial "file:$DIR/console.log"
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initrd.img"
    -append "console=ttyS0 quiet panic=-1 cryptomgr.notests $APPEND"
    -no-reboot
    -qmp "unix:$DIR/qmp.sock,server=on,wait=off"
)
[ $QMP2 = 1 ] && args+=(-qmp "unix:$DIR/qmp2.sock,server=on,wait=off")
args+=(
    -device virtio-serial-pci,id=vser0
    -chardev "socket,path=$DIR/qga.sock,server=on,wait=off,id=qga0"
    -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0
)
i=0
for spec in "${DISKS[@]}"; do
    path=$spec fmt=""
    case "$spec" in *:raw | *:qcow2) path=${spec%:*} fmt=${spec##*:} ;; esac
    [ -f "$path" ] || die "no such disk image: $path"
    path=$(cd "$(dirname "$path")" && pwd)/$(basename "$path")
    if [ -z "$fmt" ]; then
        if [ "$(head -c 4 "$path" | od -An -tx1 | tr -d ' \n')" = 514649fb ]; then fmt=qcow2; else fmt=raw; fi
    fi
    case "$path" in *,*) die "a comma in a disk path is not supported: $path" ;; esac
    n=$(disk_name $i)
    if [ $BLOCKDEV = 1 ]; then
        args+=(
            -blockdev "driver=file,filename=$path,node-name=$n-file"
            -blockdev "driver=$fmt,file=$n-file,node-name=$n"
            -device "virtio-blk-pci,drive=$n,id=$n"
        )
    else
        args+=(
            -drive "file=$path,format=$fmt,if=none,id=$n"
            -device "virtio-blk-pci,drive=$n,id=$n-dev"
        )
    fi
    i=$((i + 1))
done
[ -n "$INCOMING" ] && args+=(-incoming "$INCOMING")
args+=(-pidfile "$DIR/qemu.pid" -daemonize)

printf '%q ' "${args[@]}" >"$DIR/cmdline"
echo >>"$DIR/cmdline"
"${args[@]}" || die "qemu-system-x86_64 failed (command line in $DIR/cmdline)"
echo "$DIR"
