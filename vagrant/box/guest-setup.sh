#!/usr/bin/env bash
# Runs inside the box's root file system (chroot) while vagrant/build-box.sh
# builds it, at native speed. Everything the guests would otherwise download
# is installed here: the VMs have no way out to the internet.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# No service starts inside the chroot (nginx's package would start nginx).
printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
chmod +x /usr/sbin/policy-rc.d

apt-get update -q
list=/opt/botwall/scripts/debian-packages.txt
[ -s "$list" ] || { echo "guest-setup: $list is missing" >&2; exit 1; }
mapfile -t packages < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$list")
apt-get install -y -q --no-install-recommends "${packages[@]}"
apt-get clean

# The project's Python dependencies in the virtual environment `make install`
# makes at /opt/botwall/.venv; in the guest it finds them all installed. A
# wheel cache with setuptools lets the guest build the project itself offline.
cd /opt/botwall
/usr/bin/python3 -m venv --system-site-packages .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
mkdir -p /opt/botwall-wheels
.venv/bin/pip download -q -d /opt/botwall-wheels setuptools wheel
.venv/bin/pip uninstall -q -y botwall
find /opt/botwall -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
# pip in the guest: never the network, always the box's wheels.
cat >/etc/pip.conf <<'PIP'
[global]
no-index = true
find-links = /opt/botwall-wheels
disable-pip-version-check = true
PIP

# The vagrant user, with Vagrant's well-known key (Vagrant replaces it with
# a key of its own at the first `vagrant up`) and sudo without a password.
useradd -m -s /bin/bash vagrant
echo vagrant:vagrant | chpasswd
install -d -m 700 -o vagrant -g vagrant /home/vagrant/.ssh
install -m 600 -o vagrant -g vagrant /root/vagrant.pub /home/vagrant/.ssh/authorized_keys
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >/etc/sudoers.d/vagrant
chmod 440 /etc/sudoers.d/vagrant
echo 'UseDNS no' >/etc/ssh/sshd_config.d/vagrant.conf

echo botwall >/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 botwall\n::1 localhost ip6-localhost\n' >/etc/hosts
echo 'LABEL=botwall-root / ext4 errors=remount-ro 0 1' >/etc/fstab
cat >/etc/network/interfaces <<'NET'
auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp

source /etc/network/interfaces.d/*
NET

# An emulated guest has no cycles to spare: no timers fetching package lists
# or rebuilding indexes, no nginx of its own (the lab starts its own).
systemctl mask apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer \
  fstrim.timer nginx.service >/dev/null 2>&1 || true
update-initramfs -u -k all
rm -f /usr/sbin/policy-rc.d
