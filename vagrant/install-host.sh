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
bash "$(dirname "${BASH_SOURCE[0]}")/../scripts/install-packages.sh" install-host "${packages[@]}"
