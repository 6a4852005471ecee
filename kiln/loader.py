"""``kiln.load``: open any Kiln engine and keep every call inside the profile it was built for.

AOTInductor packages do not check their shape range themselves (a batch outside it ran without
an error, and a changed static dim returned wrong numbers), so the callable returned here
checks each input against the profile stored with the engine (``kiln.engine_format``) before
the engine sees it. torch, onnxruntime and tensorrt are imported inside the functions that need
them: importing ``kiln`` stays cheap and needs none of them.
"""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kiln.engine_format import is_swappable, read_metadata

KINDS = ("aoti", "aoti-swappable", "onnx", "tensorrt")


class ProfileError(ValueError):
    """An input the engine was not built for: wrong count, rank, dtype, or a dim out of range."""

    def __init__(self, message: str, input: str | None = None, dim: int | None = None,
                 value: int | None = None, range: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.input, self.dim, self.value, self.range = input, dim, value, range


def check_inputs(profile: Sequence[dict[str, Any]], inputs: Sequence[Any]) -> None:
    """Raise ProfileError naming the input, dim, value and range of the first problem."""
    if len(inputs) != len(profile):
        names = [p["name"] for p in profile]
        raise ProfileError(f"the engine takes {len(profile)} inputs {names}, got {len(inputs)}")
    for spec, x in zip(profile, inputs):
        name = spec["name"]
        shape = getattr(x, "shape", None)
        if shape is None:
            raise ProfileError(f"input {name!r} is a {type(x).__name__}, not a tensor", name)
        shape = [int(d) for d in shape]
        lo, hi = spec["min"], spec["max"]
        if len(shape) != len(lo):
            raise ProfileError(f"input {name!r} has {len(shape)} dims {shape}; the engine takes "
                               f"{len(lo)} dims (min {lo}, max {hi})", name)
        want = spec.get("dtype")
        got = str(getattr(x, "dtype", "")).removeprefix("torch.")
        if want and got and got != want:
            raise ProfileError(f"input {name!r} is {got}; the engine takes {want}", name)
        for i, (d, a, b) in enumerate(zip(shape, lo, hi)):
            if not a <= d <= b:
                where = f"dim {i} of input {name!r}"
                span = f"{a}" if a == b else f"[{a}, {b}]"
                raise ProfileError(
                    f"{where} is {d}, outside the engine's range {span} (profile min {lo}, "
                    f"max {hi}); compile an engine whose profile covers {shape}",
                    name, i, d, (a, b))


class LoadedEngine:
    """A callable engine: ``engine(*tensors)`` checks the profile, then runs the engine."""

    def __init__(self, run: Callable[..., Any], kind: str, metadata: dict[str, Any],
                 path: Path) -> None:
        self._run, self.kind, self.metadata, self.path = run, kind, metadata, path
        self.profile: list[dict[str, Any]] = metadata["inputs"]

    def __call__(self, *inputs: Any) -> Any:
        check_inputs(self.profile, inputs)
        return self._run(*inputs)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{p['name']}: {p['min']}..{p['max']}" for p in self.profile)
        return f"<kiln engine {self.kind} {self.path.name} ({shapes})>"


def engine_kind(path: Path) -> str:
    """Which runtime opens this file, from its content (not its name)."""
    if zipfile.is_zipfile(path):
        if is_swappable(path):
            return "aoti-swappable"
        with zipfile.ZipFile(path) as zf:
            if any("/data/aotinductor/" in f"/{n}" for n in zf.namelist()):
                return "aoti"
        raise ValueError(f"{path} is a zip but not an AOTInductor package or a Kiln engine")
    with open(path, "rb") as f:
        head = f.read(8)
    # ONNX is a protobuf ModelProto: field 1 (ir_version, varint) comes first.
    if head[:1] == b"\x08" or path.suffix == ".onnx":
        return "onnx"
    return "tensorrt"


def load_aoti_package(path: str | Path) -> Callable[..., Any]:
    """An AOTInductor engine (plain or swappable) with no profile check: for Kiln's own
    validation, which runs it at the profile's edges itself. Users call :func:`load`."""
    return _load_aoti(Path(path), is_swappable(path))


class _AotiPackage:
    """An AOTInductor package run through torch's C++ loader directly.

    ``torch._inductor.aoti_load_package`` does the same, but importing torch._inductor costs
    seconds in a fresh process (3-7 s measured here) while the C++ load takes milliseconds;
    a cache hit should not pay that. Falls back to the public loader if the C++ API differs.
    """

    def __init__(self, path: Path) -> None:
        import torch
        from torch.utils import _pytree

        self._pytree = _pytree
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        in_spec, out_spec = self.loader.get_call_spec()
        self._out_spec = _pytree.treespec_loads(out_spec)
        self._tensor = torch.Tensor

    def __call__(self, *args: Any) -> Any:
        flat = [x for x in self._pytree.tree_flatten((args, {}))[0]
                if isinstance(x, self._tensor)]
        return self._pytree.tree_unflatten(self.loader.boxed_run(flat), self._out_spec)

    def get_constant_fqns(self) -> list[str]:
        return list(self.loader.get_constant_fqns())

    def load_constants(self, constants: dict[str, Any], check_full_update: bool) -> None:
        self.loader.load_constants(constants, False, check_full_update, False, False)


def _open_package(path: Path) -> Any:
    try:
        return _AotiPackage(path)
    except (AttributeError, TypeError):  # another torch: its C++ loader's API changed
        import torch

        return torch._inductor.aoti_load_package(str(path))


def _load_aoti(path: Path, swappable: bool) -> Callable[..., Any]:
    import torch

    if not swappable:
        return _open_package(path)
    workdir = Path(tempfile.mkdtemp(prefix="kiln-engine-"))
    with zipfile.ZipFile(path) as zf:
        zf.extract("package.pt2", workdir)
        zf.extract("weights.pt", workdir)
    compiled = _open_package(workdir / "package.pt2")
    weights = torch.load(workdir / "weights.pt", weights_only=True)
    needed = compiled.get_constant_fqns()
    missing = [n for n in needed if n not in weights]
    if missing:
        raise ValueError(f"engine weights lack {missing[:5]}")
    compiled.load_constants({n: weights[n] for n in needed}, check_full_update=True)
    return compiled


def _load_onnx(path: Path, device: str, profile: Sequence[dict[str, Any]]
               ) -> Callable[..., Any]:
    import onnxruntime
    import torch

    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise RuntimeError("this onnxruntime has no CUDAExecutionProvider (install "
                               "onnxruntime-gpu) and the engine was built for cuda")
        providers.insert(0, "CUDAExecutionProvider")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    graph_inputs = [i.name for i in session.get_inputs()]
    names = [p["name"] for p in profile]
    if sorted(names) != sorted(graph_inputs):
        raise ValueError(f"the engine's profile names inputs {names}; the ONNX graph takes "
                         f"{graph_inputs}")
    outputs = [o.name for o in session.get_outputs()]

    def run(*tensors: Any) -> Any:
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
        results = [torch.from_numpy(r) for r in session.run(outputs, feeds)]
        return results[0] if len(results) == 1 else tuple(results)

    return run


def _load_tensorrt(path: Path, profile: Sequence[dict[str, Any]]) -> Callable[..., Any]:
    import torch

    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError(f"{path} is a TensorRT plan; loading it needs the TensorRT runtime "
                           f"for the version it was built with ({exc})") from None
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {path} (another TensorRT version "
                           "or GPU than it was built for)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    order = [p["name"] for p in profile]

    def run(*tensors: Any) -> Any:
        stream = torch.cuda.current_stream()
        keep = []
        for name, t in zip(order, tensors):
            t = t.contiguous().cuda()
            keep.append(t)
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
        results = []
        for name in outputs:
            dtype = getattr(torch, str(engine.get_tensor_dtype(name)).split(".")[-1].lower())
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            results.append(out)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return results[0] if len(results) == 1 else tuple(results)

    return run


def load(path: str | Path, profile: Sequence[dict[str, Any]] | None = None,
         device: str | None = None, verify: bool = True) -> LoadedEngine:
    """Load a Kiln engine (AOTInductor, swappable-weights, ONNX, TensorRT plan) from its file.

    The profile comes from the engine itself (``kiln/engine.json`` inside a zip engine, else the
    ``.kiln.json`` sidecar written on download, checked against the file's sha256); pass
    ``profile`` only for an engine that has neither. Every call is checked against it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no engine file at {path}")
    if profile is None:
        metadata = read_metadata(path, verify=verify)
    else:
        metadata = {"inputs": [dict(p) for p in profile], "device": device or "cpu"}
    kind = engine_kind(path)
    device = device or metadata.get("device") or "cpu"
    if kind in ("aoti", "aoti-swappable"):
        run = _load_aoti(path, kind == "aoti-swappable")
    elif kind == "onnx":
        run = _load_onnx(path, device, metadata["inputs"])
    else:
        run = _load_tensorrt(path, metadata["inputs"])
    return LoadedEngine(run, kind, metadata, path)
