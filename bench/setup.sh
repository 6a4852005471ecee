#!/usr/bin/env bash
# Install what the benchmark suite drives from outside the service: wrk (HTTP load), curl
# (transfers) and nginx (the baseline file server), from Debian's packages, plus py-spy in the
# project's venv (profiles of misses). Idempotent: installs only what is missing.
#
#   bash bench/setup.sh            # python -m bench calls this when a tool is missing
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${VENV:-$here/../.venv}"

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)

if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "bench/setup.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
    # The suite starts its own nginx on a free port with its own config; never the system one.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod +x /usr/sbin/policy-rc.d
        trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -m pip show -q py-spy >/dev/null 2>&1; then
    echo "bench/setup.sh: installing py-spy into $venv" >&2
    "$venv/bin/python" -m pip install -q "py-spy==0.4.3"
fi

echo "bench/setup.sh: wrk $(command -v wrk), curl $(command -v curl), nginx $(command -v nginx || echo /usr/sbin/nginx)" >&2
