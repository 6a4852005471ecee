#!/usr/bin/env bash
# Second GPU step (docs/gpu-runs.md): native backtrace of the AOTInductor load crash.
pip install -q --no-index --no-deps --target /tmp/kilnlib .gpu/wheels/*.whl 2>&1 | tail -1
export PYTHONPATH="$PWD:/tmp/kilnlib" PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ic2
grep -o -E 'avx512[a-z_]*|amx[a-z_]*' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
timeout 420 python3 scripts/gpu_aoti_debug.py 2>&1 | grep -v "FutureWarning\|return cls" | tee "$OUT/debug.txt"
