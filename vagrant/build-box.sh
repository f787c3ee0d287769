#!/usr/bin/env bash
# Builds botwall's Vagrant box (provider libvirt, format qcow2) from Debian's
# packages alone: no box is downloaded.
#
# The box is Debian 12 with its own kernel and that kernel's headers (BCC
# compiles against them), openssh, sudo, ifupdown, a `vagrant` user with
# Vagrant's well-known key, every package of scripts/debian-packages.txt, and
# a ready virtual environment with the project's Python dependencies at
# /opt/botwall/.venv. All of it is installed here, at native speed: in the
# guest, emulated, the same `make install` then only checks and installs the
# project itself.
#
# The box is cached outside git (BOTWALL_VAGRANT_CACHE, default
# /var/cache/botwall/vagrant) under a name that carries a hash of its inputs,
# so it is rebuilt only when one of them changes. Prints the box's name last.
#
#   vagrant/build-box.sh            build if needed, add to vagrant, print name
#   vagrant/build-box.sh --name     only print the name the inputs give
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
cache=${BOTWALL_VAGRANT_CACHE:-/var/cache/botwall/vagrant}
mirror=${BOTWALL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
disk_gib=12

say() { echo "build-box: $*" >&2; }

# Everything that ends up in the box: change one and the name changes.
inputs=(
  "$here/build-box.sh" "$here/box/Vagrantfile" "$here/box/guest-setup.sh"
  "$repo/scripts/debian-packages.txt" "$repo/pyproject.toml"
)
digest=$( (echo "$mirror $suite $disk_gib"; cat "${inputs[@]}") | sha256sum | cut -c1-12)
name="botwall-$suite-$digest"
if [ "${1:-}" = "--name" ]; then
  echo "$name"
  exit 0
fi
[ "$(id -u)" = 0 ] || { say "run as root (debootstrap, loop devices, mounts)"; exit 1; }
for tool in debootstrap extlinux sfdisk losetup qemu-img vagrant mkfs.ext4; do
  command -v "$tool" >/dev/null || { say "$tool is missing: run vagrant/install-host.sh"; exit 1; }
done

box="$cache/$name.box"
mkdir -p "$cache"
if vagrant box list 2>/dev/null | grep -q "^$name "; then
  say "box $name is up to date"
  echo "$name"
  exit 0
fi

if [ ! -s "$box" ]; then
  work=$(mktemp -d "$cache/build.XXXXXX")
  mnt="$work/root"
  loop=""
  cleanup() {
    for fs in dev/pts dev proc sys; do
      mountpoint -q "$mnt/$fs" 2>/dev/null && umount -l "$mnt/$fs"
    done
    mountpoint -q "$mnt" 2>/dev/null && umount "$mnt"
    [ -n "$loop" ] && losetup -d "$loop" 2>/dev/null
    rm -rf "$work"
  }
  trap cleanup EXIT
  started=$SECONDS

  # One MBR partition from 1 MiB. `losetup -P` makes no partition devices on
  # some kernels, so the file system goes on a loop device at the offset.
  raw="$work/disk.raw"
  truncate -s "${disk_gib}G" "$raw"
  printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$raw"
  loop=$(losetup --find --show --offset $((2048 * 512)) "$raw")
  # extlinux reads ext4 but not its 64bit layout.
  mkfs.ext4 -q -L botwall-root -O ^64bit "$loop"
  mkdir -p "$mnt"
  mount "$loop" "$mnt"

  say "debootstrap $suite from $mirror"
  debootstrap --include=linux-image-amd64,initramfs-tools,openssh-server,sudo,ifupdown,isc-dhcp-client,ca-certificates,python3,rsync \
    "$suite" "$mnt" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

  mount --bind /dev "$mnt/dev"
  mount --bind /dev/pts "$mnt/dev/pts"
  mount -t proc proc "$mnt/proc"
  mount -t sysfs sys "$mnt/sys"
  cp /etc/resolv.conf "$mnt/etc/resolv.conf"
  echo "deb $mirror $suite main" >"$mnt/etc/apt/sources.list"

  # The project, for its dependency list; guest-setup.sh removes all of it
  # but the virtual environment.
  mkdir -p "$mnt/opt/botwall"
  git -C "$repo" ls-files -z --cached --others --exclude-standard | tar -C "$repo" --null -T - -cf - | tar -C "$mnt/opt/botwall" -xf -
  cp "$here/box/guest-setup.sh" "$mnt/root/guest-setup.sh"
  cp /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub "$mnt/root/vagrant.pub" 2>/dev/null ||
    cp "$(dirname "$(gem contents vagrant 2>/dev/null | grep -m1 keys/vagrant.pub)")/vagrant.pub" "$mnt/root/vagrant.pub"
  say "installing Debian packages and the Python dependencies (native speed)"
  # The host's pip settings name paths that do not exist in the box.
  # pip trusts what this host trusts (a TLS-inspecting proxy's CA, say).
  cp /etc/ssl/certs/ca-certificates.crt "$mnt/root/host-ca.crt"
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 PIP_CERT=/root/host-ca.crt \
    chroot "$mnt" bash /root/guest-setup.sh >"$work/setup.log" 2>&1 ||
    { tail -n 40 "$work/setup.log" >&2; exit 1; }
  rm -f "$mnt/root/guest-setup.sh" "$mnt/root/vagrant.pub" "$mnt/root/host-ca.crt"
  rm -f "$mnt/etc/resolv.conf"

  kernel=$(basename "$(ls "$mnt"/boot/vmlinuz-* | sort -V | tail -n 1)")
  initrd="initrd.img-${kernel#vmlinuz-}"
  mkdir -p "$mnt/boot/extlinux"
  extlinux --install "$mnt/boot/extlinux" 2>/dev/null
  cat >"$mnt/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
TIMEOUT 1
PROMPT 0
LABEL debian
  LINUX /boot/$kernel
  INITRD /boot/$initrd
  APPEND root=LABEL=botwall-root ro net.ifnames=0 biosdevname=0 console=ttyS0,115200 console=tty0
EOF
  # Beside the box, for kvm-works.sh's test boot.
  cp "$mnt/boot/$kernel" "$work/vmlinuz"
  cp "$mnt/boot/$initrd" "$work/initrd"
  for fs in dev/pts dev proc sys; do umount -l "$mnt/$fs"; done
  umount "$mnt"
  losetup -d "$loop"
  loop=""
  dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none

  say "converting to qcow2 and packaging"
  qemu-img convert -O qcow2 "$raw" "$work/box.img"
  rm -f "$raw"
  cat >"$work/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $disk_gib}
EOF
  cp "$here/box/Vagrantfile" "$work/Vagrantfile"
  tar -C "$work" -cf "$box.part" metadata.json Vagrantfile box.img
  mv "$work/vmlinuz" "$cache/$name.vmlinuz"
  mv "$work/initrd" "$cache/$name.initrd"
  mv "$box.part" "$box"
  say "built $box in $((SECONDS - started)) s ($(du -h "$box" | cut -f1))"
  cleanup
  trap - EXIT
fi

# Older builds of this box: their files, their vagrant boxes.
for old in "$cache"/botwall-*.box "$cache"/botwall-*.vmlinuz "$cache"/botwall-*.initrd; do
  [[ $old == "$cache/$name".* ]] || rm -f "$old"
done
vagrant box list 2>/dev/null | awk '/^botwall-/ {print $1}' | while read -r stale; do
  [ "$stale" = "$name" ] || vagrant box remove --force --all "$stale" >&2 || true
done
vagrant box add --force --name "$name" "$box" >&2
echo "$name"
