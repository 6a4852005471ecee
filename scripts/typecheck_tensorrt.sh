#!/usr/bin/env bash
# Check the TensorRT backend's calls against the TensorRT 10.13 type stubs and the
# Torch-TensorRT sources. Neither can run here (no TensorRT, no GPU); this catches a
# misspelled or removed API that no test on this machine reaches.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${KILN_TRT_TYPECHECK_VENV:-/tmp/kiln-trt-typecheck}
if [ ! -x "$V/bin/mypy" ]; then
  python3 -m venv "$V"
  "$V/bin/pip" install -q mypy==2.4.1
  # --no-deps: the stubs depend on tensorrt itself, which cannot be installed here.
  "$V/bin/pip" install -q --no-deps tensorrt-stubs==10.13.0.35.1 torch-tensorrt==2.14.0
  SP=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$V/stubs" && cp -r "$SP/tensorrt" "$SP/tensorrt_bindings" "$V/stubs/"
  # Two syntax errors in the published stubs (a parameter named `in`, a non-default
  # parameter after a default) stop mypy from reading them at all.
  sed -i -E 's/\(self(: [A-Za-z0-9]+)?, in: /(self\1, in_: /; s/, channel_axis: int\) -> IScaleLayer/, channel_axis: int = ...) -> IScaleLayer/' \
    "$V/stubs/tensorrt_bindings/tensorrt.pyi"
fi
MYPYPATH="$V/stubs" "$V/bin/mypy" --config-file scripts/mypy-tensorrt.toml workers/backends/tensorrt.py
