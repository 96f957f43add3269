#!/usr/bin/env bash
# A real qemu-system VM and libvirt for the running-server tests (issue 9):
# qemu-system-x86_64 10 from bookworm-backports (the plain bookworm one is
# 7.2 and would remove qemu-utils 10), libvirt 9 without
# libvirt-daemon-system (it pulls in systemd), and the qemu.conf that lets a
# hand-started libvirtd run QEMU as root with no security driver (see
# /work/shared/vm/README.md). The tests start virtlogd and libvirtd
# themselves (crates/service/tests/common/libvirt.rs). Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  # The first stanza of Debian's own sources, for the backports suite.
  awk 'BEGIN{RS=""; ORS="\n\n"} NR==1' /etc/apt/sources.list.d/debian.sources \
    | sed 's/^Suites:.*/Suites: bookworm-backports/' \
    > /etc/apt/sources.list.d/bookworm-backports.sources
  apt-get update -q
fi
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v libvirtd >/dev/null || need+=(libvirt-daemon libvirt-daemon-driver-qemu)
command -v virsh >/dev/null || need+=(libvirt-clients)
if ((${#need[@]})); then
  apt-get update -q
  apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86
  apt-get install -y -q --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
fi
# qemu-utils must still be 10 (qemu-storage-daemon and the bitmaps the tests use).
qemu-img --version | grep -q 'version 10\.' || { echo "qemu-utils is not 10.x" >&2; exit 1; }

# libvirt resolves this user before it reads qemu.conf.
id libvirt-qemu >/dev/null 2>&1 || useradd -r libvirt-qemu
mkdir -p /etc/libvirt /var/log/libvirt/qemu
cat > /etc/libvirt/qemu.conf <<'CONF'
# Written by .ci/vm.sh: QEMU as root, no security driver, no namespaces or
# cgroups (no systemd here).
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = []
cgroup_controllers = []
CONF
