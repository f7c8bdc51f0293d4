#!/usr/bin/env bash
# libvirt for cli/benches/vs_libvirt.rs: installs Debian's libvirt (bookworm:
# 9.0) when missing and starts its daemons when they are not answering.
# As root on Debian 12; idempotent.
#
# The machine is a container without systemd, so nothing starts libvirtd:
# this script starts virtlogd (libvirtd hands QEMU's log to it) and the
# monolithic libvirtd by hand, both daemonized (-d), then waits until
# `virsh -c qemu:///system version` answers.
#
# /etc/libvirt/qemu.conf is left as Debian ships it: no setting was needed
# here. Measured: with the stock file libvirt runs QEMU as libvirt-qemu
# (DAC, dynamic_ownership = 1: it chowns the images and every new overlay),
# security model "none" besides DAC (no AppArmor in the container), a
# private mount namespace for QEMU's /dev and the cgroup v1 controllers the
# container offers; `virsh create` of the bench's domain,
# `snapshot-create-as --disk-only --atomic --no-metadata` and `blockcommit
# --active --pivot --shallow` all work. Settings such as user = "root",
# dynamic_ownership = 0, namespaces = [], cgroup_controllers = [] were
# therefore NOT set: the bench measures libvirt as a default install runs.
# libvirtd logs harmless errors at start (dmidecode: no /dev/mem; udev: no
# DMI device).
set -euo pipefail

URI=${VSNAP_BENCH_LIBVIRT_URI:-qemu:///system}
answers() { virsh -q -c "$URI" version >/dev/null 2>&1; }

if ! command -v virsh >/dev/null || ! command -v libvirtd >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q libvirt-daemon-system libvirt-clients
fi
answers && exit 0
pidof virtlogd >/dev/null || virtlogd -d
pidof libvirtd >/dev/null || libvirtd -d
for _ in $(seq 100); do
    answers && exit 0
    sleep 0.1
done
echo "libvirt-setup: libvirtd does not answer on $URI (see /var/log/libvirt/libvirtd.log)" >&2
exit 1
