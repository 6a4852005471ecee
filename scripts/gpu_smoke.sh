#!/usr/bin/env bash
# Kiln's GPU smoke run (docs/gpu-runs.md): set up the lent GPU host, then scripts/gpu_smoke.py.
#
# The host has torch, transformers and onnxruntime but no network: Kiln's pure-Python
# dependencies come as wheels in .whl/ (pip download --python-version 3.12 --only-binary=:all:),
# and a Debian bubblewrap .deb there, if carried, is unpacked for the build sandbox. Without
# bubblewrap the builds run unsandboxed (KILN_SANDBOX=off, which the worker announces).
# Arguments go to gpu_smoke.py (e.g. --device cpu --quick). Results land in $OUT.
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/.gpu-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv 2>&1 | head -9
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
site=/tmp/kiln-site
if compgen -G ".whl/*.whl" > /dev/null; then
  pip install -q --no-index --no-deps --target "$site" .whl/*.whl 2>&1 | tail -2
fi
if [ -z "${BWRAP:-}" ] && compgen -G ".whl/bubblewrap*.deb" > /dev/null; then
  dpkg -x .whl/bubblewrap*.deb /tmp/kiln-bwrap && BWRAP=/tmp/kiln-bwrap/usr/bin/bwrap
fi
if [ -n "${BWRAP:-}" ] && "$BWRAP" --version > /dev/null 2>&1; then
  export BWRAP KILN_BWRAP="$BWRAP" PATH="$(dirname "$BWRAP"):$PATH"
  echo "sandbox: $("$BWRAP" --version)"
else
  export KILN_SANDBOX=off
  echo "sandbox: off (no bubblewrap on this host; set BWRAP or carry .whl/bubblewrap*.deb)"
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# A fresh compiler cache per run: the builds measured are cold, as a user's first build is.
export TORCHINDUCTOR_CACHE_DIR="$(mktemp -d /tmp/kiln-inductor-XXXX)"
timeout "${KILN_SMOKE_TIMEOUT_S:-560}" python3 scripts/gpu_smoke.py "$@" 2>&1 | tee "$OUT/gpu_smoke.log" | grep -v "^W1"
echo "exit: ${PIPESTATUS[0]}; results in $OUT"
