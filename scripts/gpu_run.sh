#!/usr/bin/env bash
# The GPU run of docs/gpu-runs.md: carried wheels in .gpu/wheels (pure-Python service deps for
# the device's Python), then the AOTInductor crash study and Kiln end to end on CUDA.
set -x
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, sys; print(sys.version, torch.__version__, torch.version.cuda)"
g++ --version | head -1; uname -r; which cuda-gdb
pip install -q --no-index --no-deps --target /tmp/kilnlib .gpu/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:/tmp/kilnlib" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
set +x
timeout 200 python3 scripts/gpu_aoti_crash.py 2>&1 | tee "$OUT/crash.txt" | grep -v "^W1"
timeout 340 python3 scripts/gpu_kiln_e2e.py 2>&1 | tee "$OUT/e2e.txt" | tail -60
