#!/usr/bin/env bash
# Installs what botwall needs from Debian on a fresh machine, as root, and
# nothing when it is all there already (a second run only checks).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# One list, shared with the Vagrant box build (vagrant/build-box.sh).
mapfile -t packages < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/debian-packages.txt")
((${#packages[@]})) || { echo "install-system: $here/debian-packages.txt lists nothing" >&2; exit 1; }

bash "$here/install-packages.sh" install-system "${packages[@]}"

# BCC compiles against /lib/modules/$(uname -r)/build. When the running kernel
# has no header package of its own (a cloud or VM kernel), Debian's generic
# headers compile and load networking programs: the BPF ABI and the structs
# XDP and tc programs touch are stable uapi, and the program is verified
# against the running kernel's BTF at load time.
kernel=$(uname -r)
build=/lib/modules/$kernel/build
if [ ! -e "$build/include" ]; then
  headers=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$headers" ] || [ -z "$common" ]; then
    echo "install-system: no kernel headers under /usr/src to link for $kernel" >&2
    exit 1
  fi
  mkdir -p "/lib/modules/$kernel"
  ln -sfn "$headers" "$build"
  ln -sfn "$common" "/lib/modules/$kernel/source"
  echo "install-system: kernel $kernel has no header package; linked $headers as its build dir"
  echo "install-system: and $common as its source dir (Debian's generic headers, see README)"
fi

# BPF filesystem for pinned verdict maps.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
  echo "install-system: mounted bpffs on /sys/fs/bpf"
fi
