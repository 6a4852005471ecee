#!/usr/bin/env bash
# Lay out Kiln's carried dependencies on the lent GPU host (no network there):
# pure-Python service wheels, TensorRT-RTX 1.7.1 (its 234 MB library travels xz-compressed in two
# halves, over two calls), and Debian's bubblewrap unpacked for the build sandbox.
set -u
SITE=/tmp/site
mkdir -p $SITE
python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .gpu/wheels/*.whl 2>&1 | tail -2
# TensorRT-RTX only when carried (it builds but cannot run plans on sm_90: a run on an H200 may
# leave it behind to spend its time on the AOTInductor builds).
if compgen -G ".gpu/rtx2/*.whl" > /dev/null; then
python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .gpu/rtx2/*.whl 2>&1 | tail -2
tar xzf .gpu/rtx2/tensorrt_rtx_cu13-*.tar.gz -C /tmp && cp -r /tmp/tensorrt_rtx_cu13-1.7.1.116/tensorrt_rtx $SITE/
tar xzf .gpu/rtx2/libs-skeleton.tgz -C $SITE
[ -f .gpu/rtx1/librtx.xz.aa ] || ln -sfn /root/rtx1 .gpu/rtx1
if [ -f .gpu/rtx1/librtx.xz.aa ]; then
  python3 - <<'PY'
import lzma, shutil
class Cat:
    def __init__(self, paths): self.files = [open(p, "rb") for p in paths]
    def read(self, n=-1):
        while self.files:
            b = self.files[0].read(n)
            if b: return b
            self.files.pop(0)
        return b""
src = lzma.LZMAFile(Cat([".gpu/rtx1/librtx.xz.aa", ".gpu/rtx2/librtx.xz.ab"]))
with open("/tmp/site/tensorrt_rtx_libs/libtensorrt_rtx.so.1", "wb") as out:
    shutil.copyfileobj(src, out, 1 << 24)
PY
fi
cp .gpu/rtx2/libtensorrt_onnxparser_rtx.so.1 $SITE/tensorrt_rtx_libs/
fi
mkdir -p /tmp/bwrap && dpkg -x .gpu/bubblewrap_*.deb /tmp/bwrap
[ -d $SITE/tensorrt_rtx_libs ] && ls -la $SITE/tensorrt_rtx_libs/ | tail -3
true
