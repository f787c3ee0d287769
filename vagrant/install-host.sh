#!/usr/bin/env bash
# Installs what the Vagrant lab needs on the host, from Debian, as root, and
# nothing when it is all there already. (The box itself: vagrant/build-box.sh.)
set -euo pipefail

packages=(
  vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
  dnsmasq-base iptables
  # building the box
  debootstrap extlinux syslinux-common fdisk e2fsprogs git
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-host: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "install-host: Debian packages already installed"
fi
