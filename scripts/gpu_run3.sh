#!/usr/bin/env bash
# Third GPU step (docs/gpu-runs.md): the libstdc++ fix, then Kiln end to end with it.
pip install -q --no-index --no-deps --target /tmp/kilnlib .gpu/wheels/*.whl 2>&1 | tail -1
export PYTHONPATH="$PWD:/tmp/kilnlib" PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ic3
timeout 170 python3 scripts/gpu_aoti_fix.py 2>&1 | grep -v "FutureWarning\|return cls" | tee "$OUT/fix.txt"
KILN_GPU_MAX_ATTEMPTS=1 timeout 330 python3 scripts/gpu_kiln_e2e.py > "$OUT/e2e.txt" 2>&1
grep -v '"GET \|"POST \|FutureWarning\|return cls' "$OUT/e2e.txt" | tail -40
