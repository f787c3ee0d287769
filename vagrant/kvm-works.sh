#!/usr/bin/env bash
# Exit 0 when KVM boots the box's Debian kernel on this host, 1 otherwise.
#
# /dev/kvm can exist and still not boot a Debian kernel (nested virtualisation
# that stops short): the only honest test is to boot it. The kernel and its
# initramfs, which build-box.sh keeps beside the box, get 60 s to reach the
# initramfs's shell; BOTWALL_VAGRANT_DRIVER=kvm|qemu skips the test.
set -uo pipefail
box=${1:?usage: kvm-works.sh BOX-NAME}
cache=${BOTWALL_VAGRANT_CACHE:-/var/cache/botwall/vagrant}
case "${BOTWALL_VAGRANT_DRIVER:-}" in
  kvm) exit 0 ;;
  qemu) exit 1 ;;
esac
[ -r /dev/kvm ] && [ -w /dev/kvm ] || exit 1
kernel="$cache/$box.vmlinuz"
initrd="$cache/$box.initrd"
[ -s "$kernel" ] && [ -s "$initrd" ] || exit 1
out=$(timeout 60 qemu-system-x86_64 -accel kvm -cpu host -m 512 -nodefaults -display none \
  -serial stdio -no-reboot -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyS0 panic=-1 rdinit=/bin/sh" </dev/null 2>&1 | grep -m1 -o "Run /bin/sh as init process")
[ -n "$out" ]
