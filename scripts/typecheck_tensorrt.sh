#!/usr/bin/env bash
# Check the TensorRT backends' calls against the TensorRT-RTX 1.7.1 Python API that workers use.
#
# The bindings wheel ships no .pyi, so stubs are generated from the installed extension module
# (mypy's stubgen reads pybind11's signatures). Standard TensorRT 10.15 has the same API for
# everything Kiln calls except what the builder guards by option (hardware compatibility,
# version compatibility, timing cache), which the RTX 1.7 module also exposes. Variables that
# hold TensorRT objects are annotated with these types in workers/backends/tensorrt/, so a
# misspelled or removed method is an error here, on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
RTX=1.7.1.116
V=${KILN_TRT_TYPECHECK_VENV:-/tmp/kiln-trt-typecheck-$RTX}
if [ ! -x "$V/bin/mypy" ] || [ ! -f "$V/stubs/tensorrt_rtx/__init__.pyi" ]; then
  python3 -m venv "$V"
  "$V/bin/pip" install -q mypy==2.4.1
  # --no-deps: the three parts are named explicitly (the libs carry libtensorrt_rtx.so).
  "$V/bin/pip" install -q --no-deps "tensorrt-rtx-cu13==$RTX" \
    "tensorrt-rtx-cu13-bindings==$RTX" "tensorrt-rtx-cu13-libs==$RTX"
  rm -rf "$V/stubs" && "$V/bin/stubgen" -q -p tensorrt_rtx_bindings -o "$V/stubs"
  # One signature in the bindings puts a parameter without a default after defaults
  # (add_scale_nd's channel_axis), which stops mypy from reading the stubs at all.
  sed -i -E 's/, channel_axis: typing.SupportsInt\) -> IScaleLayer/, channel_axis: typing.SupportsInt = ...) -> IScaleLayer/' \
    "$V/stubs/tensorrt_rtx_bindings/tensorrt_rtx.pyi"
  mkdir -p "$V/stubs/tensorrt_rtx"
  printf '%s\n' 'from tensorrt_rtx_bindings.tensorrt_rtx import *' '__version__: str' \
    > "$V/stubs/tensorrt_rtx/__init__.pyi"
fi
export MYPYPATH="$V/stubs"
# The stubs must catch a wrong call, or this check proves nothing.
probe=$(mktemp -d)/probe.py
printf '%s\n' 'import tensorrt_rtx as trt' 'b = trt.Builder(trt.Logger())' \
  'b.create_netwrk(0)' > "$probe"
if "$V/bin/mypy" --config-file scripts/mypy-tensorrt.toml "$probe" >/dev/null; then
  echo "typecheck_tensorrt: the stubs did not catch a misspelled method" >&2; exit 1
fi
"$V/bin/mypy" --config-file scripts/mypy-tensorrt.toml workers/backends/tensorrt
