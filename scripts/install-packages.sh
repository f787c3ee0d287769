#!/usr/bin/env bash
# install-packages.sh NAME PACKAGE...: installs those of the Debian packages
# that are missing, as root, and says so; says so too when none is.
set -euo pipefail
name=$1
shift
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "$name: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # tshark asks whether non-root users may capture; the default answer is fine.
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "$name: Debian packages already installed"
fi
