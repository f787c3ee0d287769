#!/usr/bin/env bash
# make test-vagrant: botwall's lab across three VMs, from nothing to nothing.
#
# Installs the host's packages, builds the box if its inputs changed, starts
# the libvirt daemons (there may be no systemd to do it), defines a storage
# pool, runs `python -m lab.vagrant` (VMs up, a short mixed scenario, the
# checks through the api VM's admin API, the report in vagrant-report/, VMs
# destroyed), and stops and undefines everything it started, whatever happened.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
cache=${BOTWALL_VAGRANT_CACHE:-/var/cache/botwall/vagrant}
pool=botwall-vagrant
python=${PYTHON:-$repo/.venv/bin/python}
say() { echo "test-vagrant: $*" >&2; }

[ "$(id -u)" = 0 ] || { say "run as root"; exit 1; }
bash "$here/install-host.sh"
box=$(bash "$here/build-box.sh" | tail -n 1)
export BOTWALL_VAGRANT_BOX=$box BOTWALL_VAGRANT_POOL=$pool
export LIBVIRT_DEFAULT_URI=qemu:///system

started_daemons=()
started_networks_before=""
cleanup() {
  local status=$?
  # Anything vagrant left (a failed `up`): its domains and their disks.
  for domain in $(virsh list --all --name 2>/dev/null | grep '^vagrant_' || true); do
    virsh destroy "$domain" >/dev/null 2>&1 || true
    virsh undefine "$domain" --remove-all-storage >/dev/null 2>&1 || true
  done
  # The networks vagrant-libvirt made, and any this run's libvirtd started.
  for net in $(virsh net-list --all --name 2>/dev/null || true); do
    if [[ $net == botwall-* ]] || ! grep -qx "$net" <<<"$started_networks_before"; then
      virsh net-destroy "$net" >/dev/null 2>&1 || true
      [[ $net == botwall-* ]] && { virsh net-undefine "$net" >/dev/null 2>&1 || true; }
    fi
  done
  virsh pool-destroy "$pool" >/dev/null 2>&1 || true
  virsh pool-undefine "$pool" >/dev/null 2>&1 || true
  for daemon in "${started_daemons[@]}"; do
    say "stopping $daemon"
    pkill -x "$daemon" || true
  done
  for daemon in "${started_daemons[@]}"; do
    for _ in $(seq 50); do pgrep -x "$daemon" >/dev/null || break; sleep 0.2; done
  done
  exit "$status"
}
trap cleanup EXIT

driver=$(bash "$here/kvm-works.sh" "$box" && echo kvm || echo qemu)
export BOTWALL_VAGRANT_DRIVER=$driver
say "box $box, driver $driver (kvm only where it boots a Debian kernel)"

for daemon in virtlogd libvirtd; do
  if ! pgrep -x "$daemon" >/dev/null; then
    say "starting $daemon"
    if [ "$daemon" = libvirtd ] && [ "$driver" = qemu ] && [ -e /dev/kvm ]; then
      # A /dev/kvm that cannot boot a guest still makes libvirt's probe of
      # QEMU report KVM, while its own check (as the qemu user) finds none:
      # every call then finds its capabilities cache stale and probes QEMU
      # again (seconds each). This libvirtd, in a mount namespace of its
      # own, sees no usable /dev/kvm, and gives its guests no private /dev
      # (it would try to carry the hidden /dev/kvm into it). The host's
      # files are untouched.
      touch "$cache/no-kvm" && chmod 000 "$cache/no-kvm"
      { cat /etc/libvirt/qemu.conf; echo 'namespaces = []'; } >"$cache/qemu.conf"
      unshare --mount --propagation private sh -c \
        'mount --bind "$1" /dev/kvm && mount --bind "$2" /etc/libvirt/qemu.conf && exec libvirtd -d' \
        sh "$cache/no-kvm" "$cache/qemu.conf"
    else
      "$daemon" -d
    fi
    started_daemons=("$daemon" "${started_daemons[@]}")
  fi
done
for _ in $(seq 100); do virsh version >/dev/null 2>&1 && break; sleep 0.2; done
# libvirtd autostarts its default network: note what ran before us, so that
# only what this run started is stopped.
if ((${#started_daemons[@]})) && [[ " ${started_daemons[*]} " == *" libvirtd "* ]]; then
  started_networks_before=""
else
  started_networks_before=$(virsh net-list --name 2>/dev/null || true)
fi

mkdir -p "$cache/pool"
if ! virsh pool-info "$pool" >/dev/null 2>&1; then
  virsh pool-define-as "$pool" dir --target "$cache/pool" >/dev/null
fi
virsh pool-start "$pool" >/dev/null 2>&1 || true
# Box volumes of older builds are never used again, and a VM disk here is a
# run's that was killed before its teardown: the pool is this script's own.
for volume in $(virsh vol-list "$pool" 2>/dev/null | awk 'NR > 2 {print $1}'); do
  if [[ $volume == vagrant_* ]] || [[ $volume == botwall-* && $volume != "$box"_* ]]; then
    virsh vol-delete --pool "$pool" "$volume" >/dev/null
  fi
done


cd "$repo"
"$python" -m lab.vagrant --report "${BOTWALL_VAGRANT_REPORT:-vagrant-report}" "$@"
