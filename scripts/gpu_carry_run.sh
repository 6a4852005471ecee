#!/usr/bin/env bash
# One GPU run: lay out the carried dependencies, check the sandbox works here, run the smoke.
set -u
t0=$(date +%s)
bash scripts/gpu_carry_prep.sh
export PYTHONPATH=/tmp/site KILN_API_KEYS=smoke:smoke:admin KILN_API_KEY=smoke
B=/tmp/bwrap/usr/bin/bwrap
if $B --unshare-all --die-with-parent --ro-bind / / --proc /proc --dev /dev true 2>/tmp/bwrap.err; then
  export BWRAP=$B; echo "bwrap works: $($B --version)"
else
  echo "bwrap cannot make namespaces here: $(cat /tmp/bwrap.err)"; export KILN_SANDBOX=off
fi
python3 -c "import tensorrt_rtx as t; print('tensorrt_rtx', t.__version__)" 2>&1 | tail -1
echo "prep took $(( $(date +%s) - t0 )) s"
export KILN_SMOKE_TIMEOUT_S=$(( 570 - ($(date +%s) - t0) - ${SMOKE_MARGIN_S:-20} ))
OUT=$OUT bash scripts/gpu_smoke.sh "$@"
