#!/usr/bin/env bash
# Installs everything mcmw, its demo, its tests and tools/bench need on a Debian 12 machine (as root):
# system packages, then a virtual environment in .venv with mcmw and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iproute2 procps python3 python3-venv python3-dev gcc libc6-dev libssl-dev
          tshark ffmpeg iperf socat tcpdump ethtool)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -q >/dev/null
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own interpreter (the python3 package above) is built with PGO and LTO: the
# data path runs about a quarter faster on it than on a plain source build that may come
# first in PATH (pyenv). Any other python3 >= 3.11 works.
if [ ! -x .venv/bin/python ]; then
    if [ -x /usr/bin/python3 ]; then /usr/bin/python3 -m venv .venv; else python3 -m venv .venv; fi
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: ready (.venv/bin/mcmw)" >&2
