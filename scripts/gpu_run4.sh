#!/usr/bin/env bash
# Fourth GPU step (docs/gpu-runs.md): compiler set-up and alternative compilers.
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ic4
timeout 250 python3 scripts/gpu_aoti_fix2.py 2>&1 | grep -v "FutureWarning\|return cls" | tee "$OUT/fix2.txt"
