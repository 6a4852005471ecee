"""The TensorRT backend: a serialized TensorRT plan (or a Torch-TensorRT program) per profile.

Route: Torch-TensorRT's ``convert_exported_program_to_serialized_trt_engine``, not
``torch.onnx.export`` followed by TensorRT's ONNX parser. Why:

- It reads the ExportedProgram itself. The ONNX route adds a second exporter (onnxscript's
  aten translations, then the parser's ONNX coverage) whose gaps and bugs are separate from
  TensorRT's, and ``onnx``/``onnxscript`` on every GPU worker.
- The ``exported_program`` format (PyTorch fallback for what TensorRT cannot convert) exists
  only in Torch-TensorRT. With one route for both formats, an op that fails in ``engine``
  fails for the same reason there, and the user is told to try ``exported_program``.
- Binding names are the program's placeholder names, which are the profile's input names;
  ``Input.opt_shape`` is honoured verbatim, so the engine's profile is the requested one
  (checked after every build against the plan itself).
- Precision needs no flag on either route: both build strongly typed networks, so layer
  precisions follow the program's dtypes (Torch-TensorRT >= 2.13 has no
  ``enabled_precisions``; 2.11/2.12 default to ``use_explicit_typing=True``).

What the ONNX route would have given, and how this module makes up for it:

- Full ``IBuilderConfig`` control: the options Kiln offers (optimisation level, workspace,
  Ampere+ hardware compatibility, version compatibility) all exist as Torch-TensorRT settings.
- Its own timing-cache handling: Torch-TensorRT rewrites ``timing_cache_path`` with a plain
  ``open("wb")``. Each build therefore gets a private copy of the host's shared cache, and
  afterwards the private one is merged back (``ITimingCache.combine``) under a file lock and
  written by atomic rename, so concurrent builds on one host neither tear nor drop entries.
- ``hardware_compatible`` was reported ignored once (pytorch/TensorRT#3941): the level is
  read back from the plan and a mismatch fails the build.
- The torch pin: Torch-TensorRT X.Y requires torch X.Y, while the ``tensorrt`` wheel alone
  would not. Workers pin the pair together; both versions are in the toolchain.

Compatibility and the cache key: ``toolchain()`` reports the facts of the host (real
``sm_XY``, GPU name, exact versions), since that is what a build used. ``key_toolchain()``
turns them into the key's form: a ``hardware_compatible`` engine runs on any Ampere-or-later
GPU, so its key says ``ampere_plus`` for both the compute capability and the GPU, and a
worker on any such GPU computes the same key. ``version_compatible`` does not relax the
TensorRT version in the key: Torch-TensorRT builds such plans with ``EXCLUDE_LEAN_RUNTIME``,
so a newer TensorRT could load them only with the building version's lean runtime library
(``Runtime.load_runtime``), which workers do not carry; and "loadable by later versions" is an
ordering an equality key cannot express.

tensorrt and torch_tensorrt are imported inside functions: this module must import, and its
pure helpers must run, on hosts without either (the API host, CI).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from service.errors import KilnError
from workers.backends.base import BuildResult, InputProfile, Runner

if TYPE_CHECKING:  # only for mypy with tensorrt-stubs: neither imports on CI or the API host
    import tensorrt as trt

ENGINE_FORMAT = "engine"
PROGRAM_FORMAT = "exported_program"
PROGRAM_SUFFIX = ".pt2"
AMPERE_PLUS = "ampere_plus"

TIMING_CACHE_ENV = "KILN_TRT_TIMING_CACHE_DIR"
DEFAULT_TIMING_CACHE_DIR = "~/.cache/kiln/trt-timing"

# Keyed by ``trt.DataType.name`` so the table needs no tensorrt import.
TRT_TO_TORCH_DTYPE: dict[str, torch.dtype] = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "FP8": torch.float8_e4m3fn,
}


class TensorRTBackend:
    name = "tensorrt"
    artifact_suffix = ".engine"

    def unavailable_reason(self) -> str | None:
        for module in ("tensorrt", "torch_tensorrt"):
            try:
                importlib.import_module(module)
            # A broken install raises OSError (missing libnvinfer) as often as ImportError.
            except Exception as exc:
                return f"{module} is not importable: {type(exc).__name__}: {exc}"
        if not torch.cuda.is_available():
            return "no CUDA GPU"
        return None

    def devices(self) -> list[str]:
        return ["cuda"] if self.unavailable_reason() is None else []

    def toolchain(self, device: str) -> dict[str, str]:
        import tensorrt as trt
        import torch_tensorrt

        major, minor = torch.cuda.get_device_capability()
        return {
            "torch": torch.__version__,
            "tensorrt": trt.__version__,
            "torch_tensorrt": torch_tensorrt.__version__,
            "cuda": torch.version.cuda or "",
            "compute_capability": f"sm_{major}{minor}",
            "gpu": torch.cuda.get_device_name(),
        }

    def key_toolchain(self, device: str, options: dict[str, Any]) -> dict[str, str]:
        """The toolchain as it belongs in the engine's cache key (see the module docstring)."""
        return key_toolchain(self.toolchain(device), options)

    def build(
        self,
        program: torch.export.ExportedProgram,
        profile: Sequence[InputProfile],
        device: str,
        options: dict[str, Any],
        workdir: Path,
        log: Callable[[str], None],
    ) -> BuildResult:
        if device != "cuda":
            raise KilnError(
                "unsupported_device", f"the tensorrt backend builds for 'cuda', not {device!r}"
            )
        fmt = options.get("format", ENGINE_FORMAT)
        problems = check_profile(profile, fmt)
        if problems:
            raise KilnError(
                "invalid_profile",
                "the shape profile cannot be built",
                status=422,
                details={"problems": problems},
            )
        toolchain = self.toolchain(device)
        if options["hardware_compatible"] and not is_ampere_plus(toolchain["compute_capability"]):
            raise KilnError(
                "unsupported_device",
                "hardware_compatible engines must be built on an Ampere or later GPU "
                f"(this one is {toolchain['compute_capability']})",
                status=422,
            )

        import torch_tensorrt

        workdir = Path(workdir)
        # list[Any]: Torch-TensorRT annotates arg_inputs as Sequence[Sequence[Any]], yet its
        # documented use (and this one) passes Input objects.
        inputs: list[Any] = [torch_tensorrt.Input(**kw) for kw in profile_to_inputs(profile)]
        shared_cache = timing_cache_file(timing_cache_dir(), toolchain)
        build_cache = workdir / "timing.cache"
        cache_was_warm = _copy_if_exists(shared_cache, build_cache)
        log(f"timing cache {shared_cache} ({'warm' if cache_was_warm else 'cold'})")
        settings = torch_tensorrt_settings(options)
        settings["timing_cache_path"] = str(build_cache)

        with forward_logs(TORCH_TENSORRT_LOGS, log):
            if fmt == ENGINE_FORMAT:
                plan = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
                    program, arg_inputs=inputs, **settings
                )
                artifact = workdir / f"model{self.artifact_suffix}"
                artifact.write_bytes(plan)
            else:
                artifact = workdir / f"model{PROGRAM_SUFFIX}"
                _compile_and_save_program(program, profile, inputs, settings, artifact)
        merged = merge_timing_cache(shared_cache, build_cache, log)

        report: dict[str, Any] = {
            "format": fmt,
            "artifact_suffix": artifact.suffix,
            "size_bytes": artifact.stat().st_size,
            "toolchain": toolchain,
            "builder": {k: v for k, v in settings.items() if k != "timing_cache_path"},
            "precision": "strongly typed: layer dtypes follow the program's dtypes",
            "weight_dtypes": sorted(
                {str(t.dtype).removeprefix("torch.") for t in program.state_dict.values()}
            ),
            "timing_cache": {"path": str(shared_cache), "warm": cache_was_warm, "saved": merged},
        }
        if fmt == ENGINE_FORMAT:
            info = inspect_engine(artifact)
            report["engine"] = info
            problems = check_engine_against_request(profile, options, info)
            if problems:
                raise KilnError(
                    "engine_mismatch",
                    "the built engine is not the one requested",
                    status=500,
                    details={"problems": problems},
                )
        else:
            # dynamo.compile takes the engine's opt from the program's example sizes and
            # (before 2.14) its min/max from range_constraints, not from Input: the
            # requested opt is then only a hint, and the engine may span more than asked.
            report["profile_note"] = (
                "opt is the program's export-time example size; min/max may be the "
                "program's range_constraints"
            )
        return BuildResult(artifact=artifact, report=report)

    def load(self, artifact: Path, device: str, profile: Sequence[InputProfile]) -> Runner:
        if device != "cuda":
            raise ValueError(f"the tensorrt backend runs on 'cuda', not {device!r}")
        artifact = Path(artifact)
        if artifact.suffix == PROGRAM_SUFFIX:
            return _load_program(artifact)
        return _EngineRunner(artifact, profile)


# ---------------------------------------------------------------------------------------------
# Pure helpers: no tensorrt, no GPU.


def profile_to_inputs(profile: Sequence[InputProfile]) -> list[dict[str, Any]]:
    """Each profile input as ``torch_tensorrt.Input`` keyword arguments, in profile order.

    A fully static input is given as ``shape`` so Torch-TensorRT treats it as static rather
    than as a one-point range.
    """
    inputs = []
    for p in profile:
        kwargs: dict[str, Any] = {"name": p.name, "dtype": torch_dtype(p.dtype)}
        if p.min == p.opt == p.max:
            kwargs["shape"] = tuple(p.min)
        else:
            kwargs.update(min_shape=tuple(p.min), opt_shape=tuple(p.opt), max_shape=tuple(p.max))
        inputs.append(kwargs)
    return inputs


def torch_dtype(name: str) -> torch.dtype:
    """A profile's dtype name ("float16") as a torch dtype; ValueError when it is not one."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def check_profile(profile: Sequence[InputProfile], fmt: str = ENGINE_FORMAT) -> list[str]:
    """What TensorRT cannot build from ``profile``; the service checks the program's ranges."""
    problems = []
    for p in profile:
        if not len(p.min) == len(p.opt) == len(p.max):
            problems.append(f"input {p.name!r}: min, opt and max have different ranks")
            continue
        try:
            torch_dtype(p.dtype)
        except ValueError as exc:
            problems.append(f"input {p.name!r}: {exc}")
        for axis, (lo, mid, hi) in enumerate(zip(p.min, p.opt, p.max, strict=True)):
            if not 0 <= lo <= mid <= hi:
                problems.append(
                    f"input {p.name!r} dim {axis}: need 0 <= min <= opt <= max, "
                    f"got {lo}, {mid}, {hi}"
                )
            elif lo == 0 and hi > 0:
                # TensorRT clamps a 0 minimum to 1, so the engine would not accept empty inputs.
                problems.append(f"input {p.name!r} dim {axis}: a dynamic dim cannot start at 0")
            elif fmt == PROGRAM_FORMAT and lo != hi and mid == 1:
                # Re-exporting at opt size hits torch.export's 0/1 specialisation.
                problems.append(
                    f"input {p.name!r} dim {axis}: opt must be >= 2 for the exported_program format"
                )
    return problems


def torch_tensorrt_settings(options: dict[str, Any]) -> dict[str, Any]:
    """Torch-TensorRT keyword arguments for the backend's options (TensorRTOptions)."""
    settings: dict[str, Any] = {
        "optimization_level": options["optimization_level"],
        "hardware_compatible": options["hardware_compatible"],
        "version_compatible": options["version_compatible"],
        # Said out loud because it is a precision choice: TensorRT may run float32 convolutions
        # and matmuls in TF32, as eager PyTorch does for convolutions by default.
        "disable_tf32": False,
        # Kiln keeps its own engine cache; Torch-TensorRT's ignores weights and node args.
        "cache_built_engines": False,
        "reuse_cached_engines": False,
        "immutable_weights": True,
    }
    if options.get("workspace_mb") is not None:
        settings["workspace_size"] = int(options["workspace_mb"]) * 2**20
    return settings


def is_ampere_plus(compute_capability: str) -> bool:
    match = re.fullmatch(r"sm_(\d+?)(\d)", compute_capability)
    return match is not None and int(match.group(1)) >= 8


def key_toolchain(toolchain: dict[str, str], options: dict[str, Any]) -> dict[str, str]:
    """The toolchain as the cache key should hold it, given the build options."""
    key = dict(toolchain)
    if options.get("hardware_compatible"):
        key["compute_capability"] = AMPERE_PLUS
        key["gpu"] = AMPERE_PLUS
    return key


def timing_cache_dir() -> Path:
    return Path(os.environ.get(TIMING_CACHE_ENV) or DEFAULT_TIMING_CACHE_DIR).expanduser()


def timing_cache_file(cache_dir: Path, toolchain: dict[str, str]) -> Path:
    """One cache file per GPU model and TensorRT version: TensorRT refuses to mix either."""
    gpu = re.sub(r"[^a-z0-9]+", "-", toolchain["gpu"].lower()).strip("-")
    name = f"{gpu}-{toolchain['compute_capability']}-trt{toolchain['tensorrt']}.cache"
    return Path(cache_dir) / name


def check_engine_against_request(
    profile: Sequence[InputProfile], options: dict[str, Any], info: dict[str, Any]
) -> list[str]:
    """Where an engine (as ``inspect_engine`` describes it) differs from what was asked."""
    problems = []
    inputs = {i["name"]: i for i in info["inputs"]}
    wanted = [p.name for p in profile]
    if sorted(wanted) != sorted(inputs):
        problems.append(f"engine inputs {sorted(inputs)} are not the profile's {sorted(wanted)}")
    for p in profile:
        spec = inputs.get(p.name)
        if spec is None:
            continue
        if spec["dtype"] != p.dtype:
            problems.append(f"input {p.name!r}: engine dtype {spec['dtype']}, asked {p.dtype}")
        asked = {"min": list(p.min), "opt": list(p.opt), "max": list(p.max)}
        got = spec["profile"] or {point: spec["shape"] for point in asked}
        for point in ("min", "opt", "max"):
            if list(got[point]) != asked[point]:
                problems.append(
                    f"input {p.name!r}: engine {point} {list(got[point])}, asked {asked[point]}"
                )
    if options.get("hardware_compatible") and info["hardware_compatibility_level"] != "AMPERE_PLUS":
        problems.append(
            f"engine hardware compatibility is {info['hardware_compatibility_level']},"
            " asked AMPERE_PLUS"
        )
    return problems


# Torch-TensorRT logs through "torch_tensorrt.*"; TensorRT's own messages reach Python through
# a logger outside that hierarchy. TensorRT's INFO is per-layer chatter: keep its warnings only.
TORCH_TENSORRT_LOGS = {
    "torch_tensorrt": logging.INFO,
    "torch_tensorrt [TensorRT Conversion Context]": logging.WARNING,
}


@contextlib.contextmanager
def forward_logs(levels: dict[str, int], log: Callable[[str], None]) -> Iterator[None]:
    """Send Python log records of the named loggers, from the given levels, to the build log."""

    class _Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log(f"{record.levelname.lower()}: {record.getMessage()}")

    saved = []
    for name, level in levels.items():
        logger, handler = logging.getLogger(name), _Forward(level)
        saved.append((logger, handler, logger.level))
        logger.addHandler(handler)
        # Lower the logger's own threshold if needed, or the records never reach the handler.
        if logger.getEffectiveLevel() > level:
            logger.setLevel(level)
    try:
        yield
    finally:
        for logger, handler, old_level in saved:
            logger.removeHandler(handler)
            logger.setLevel(old_level)


# ---------------------------------------------------------------------------------------------
# Timing cache: shared per host, merged back after each build.


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _copy_if_exists(source: Path, target: Path) -> bool:
    # Writers replace the file by rename, so a reader never sees half of one: no lock needed.
    try:
        shutil.copyfile(source, target)
    except FileNotFoundError:
        return False
    return True


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def merge_timing_cache(shared: Path, built: Path, log: Callable[[str], None]) -> bool:
    """Fold the build's timing cache into the host's shared one; True when it was saved.

    Another build may have saved the shared file since this one copied it, so the two are
    combined rather than the newer overwriting the older. A failure here never fails the
    build: the cache only saves time.
    """
    if not built.exists():
        return False
    try:
        with _locked(shared):
            data = built.read_bytes()
            if shared.exists():
                data = _combine_timing_caches(shared.read_bytes(), data, log)
            _atomic_write(shared, data)
        return True
    except Exception as exc:
        log(f"timing cache not saved: {type(exc).__name__}: {exc}")
        return False


def _combine_timing_caches(shared: bytes, ours: bytes, log: Callable[[str], None]) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.ERROR)
    config = trt.Builder(logger).create_builder_config()
    combined = config.create_timing_cache(shared)
    # ignore_mismatch=False: never fold in entries from another device or TensorRT version.
    if combined.combine(config.create_timing_cache(ours), False):
        return bytes(memoryview(combined.serialize()))
    log("timing cache: could not combine with the shared cache; replacing it")
    return ours


# ---------------------------------------------------------------------------------------------
# Engines: inspection and running.


def _trt_logger() -> trt.ILogger:
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def _deserialize(path: Path) -> tuple[trt.Runtime, trt.ICudaEngine]:
    import tensorrt as trt

    runtime = trt.Runtime(_trt_logger())
    # engine_host_code_allowed stays False: Kiln never builds plans that embed a lean runtime.
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:  # what TensorRT returns on a version or device mismatch (stubs say never)
        raise RuntimeError(
            f"TensorRT {trt.__version__} could not load {path}: it was built by another "
            "TensorRT version or for another GPU (see the TensorRT log above)"
        )
    # The runtime must outlive the engine; keep them together.
    return runtime, engine


def _dtype_name(trt_dtype: trt.DataType) -> str:
    torch_equivalent = TRT_TO_TORCH_DTYPE.get(trt_dtype.name)
    return str(torch_equivalent).removeprefix("torch.") if torch_equivalent else trt_dtype.name


def _dims(dims: trt.Dims) -> list[int]:
    return [int(dims[i]) for i in range(len(dims))]


def _describe_engine(engine: trt.ICudaEngine) -> dict[str, Any]:
    import tensorrt as trt

    info: dict[str, Any] = {
        "tensorrt": trt.__version__,
        "num_optimization_profiles": engine.num_optimization_profiles,
        "hardware_compatibility_level": engine.hardware_compatibility_level.name,
        "device_memory_bytes": engine.device_memory_size_v2,
        "inputs": [],
        "outputs": [],
    }
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        shape = _dims(engine.get_tensor_shape(name))
        entry: dict[str, Any] = {
            "name": name,
            "dtype": _dtype_name(engine.get_tensor_dtype(name)),
            "shape": shape,
        }
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            entry["profile"] = None
            if -1 in shape:
                lo, mid, hi = engine.get_tensor_profile_shape(name, 0)
                entry["profile"] = {"min": _dims(lo), "opt": _dims(mid), "max": _dims(hi)}
            entry["shape_tensor"] = engine.is_shape_inference_io(name)
            info["inputs"].append(entry)
        else:
            info["outputs"].append(entry)
    return info


def inspect_engine(path: Path) -> dict[str, Any]:
    """What a plan says about itself: I/O names, dtypes, shapes and profile-0 ranges."""
    _, engine = _deserialize(path)
    return _describe_engine(engine)


def _torch_dtype_of(name: str, dtype: str) -> torch.dtype:
    try:
        return torch_dtype(dtype)
    except ValueError:
        raise NotImplementedError(
            f"engine tensor {name!r} is {dtype}, which the runner cannot hold in a torch tensor"
        ) from None


class _EngineRunner:
    """Runs one plan with one execution context: not for concurrent calls."""

    def __init__(self, path: Path, profile: Sequence[InputProfile]) -> None:
        # The runtime and engine must outlive the context, so the runner holds all three.
        self.runtime, self.engine = _deserialize(path)
        info = _describe_engine(self.engine)
        shape_tensors = [i["name"] for i in info["inputs"] if i["shape_tensor"]]
        if shape_tensors:
            raise NotImplementedError(
                f"engines with shape-tensor inputs {shape_tensors} are not supported by this runner"
            )
        engine_inputs = [i["name"] for i in info["inputs"]]
        self.input_names = [p.name for p in profile] if profile else engine_inputs
        if sorted(self.input_names) != sorted(engine_inputs):
            raise ValueError(
                f"profile inputs {self.input_names} do not match the engine's "
                f"inputs {engine_inputs}"
            )
        self.input_dtypes = {
            i["name"]: _torch_dtype_of(i["name"], i["dtype"]) for i in info["inputs"]
        }
        self.outputs = [
            (o["name"], _torch_dtype_of(o["name"], o["dtype"])) for o in info["outputs"]
        ]
        self.context = self.engine.create_execution_context()

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(tensors) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs, got {len(tensors)}")
        context = self.context
        # The context holds raw addresses: `feeds` keeps the input tensors alive until the sync.
        feeds = []
        for name, tensor in zip(self.input_names, tensors, strict=True):
            if tensor.dtype != self.input_dtypes[name]:
                raise TypeError(
                    f"input {name!r} must be {self.input_dtypes[name]}, got {tensor.dtype}"
                )
            tensor = tensor.to("cuda").contiguous()
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(
                    f"input {name!r} shape {tuple(tensor.shape)} is outside the engine's profile"
                )
            context.set_tensor_address(name, tensor.data_ptr())
            feeds.append(tensor)
        unresolved = context.infer_shapes()
        if unresolved:
            raise RuntimeError(f"TensorRT could not infer the shapes of {unresolved}")
        results = []
        for name, dtype in self.outputs:
            shape = _dims(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise NotImplementedError(f"output {name!r} has a data-dependent shape {shape}")
            out = torch.empty(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            results.append(out)
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        stream.synchronize()
        return results


# ---------------------------------------------------------------------------------------------
# The exported_program format.


def program_dynamic_shapes(
    program: torch.export.ExportedProgram, profile: Sequence[InputProfile]
) -> dict[str, dict[int, Any] | None]:
    """``torch.export`` dynamic_shapes for re-exporting over ``profile``'s ranges.

    Torch-TensorRT would infer them from ``Input``s, but with one Dim per input and axis;
    inputs that share a symbol in the program (a batch dim) must share one Dim, or the
    re-export fails on the equality it finds.
    """
    by_symbol: dict[str, Any] = {}
    ranges = {p.name: p for p in profile}
    shapes: dict[str, dict[int, Any] | None] = {}
    for name, symbols in input_dim_symbols(program).items():
        p = ranges.get(name)
        axes: dict[int, Any] = {}
        for axis, symbol in enumerate(symbols):
            if p is None or symbol is None or p.min[axis] == p.max[axis]:
                continue
            bounds = (p.min[axis], p.max[axis])
            if symbol not in by_symbol:
                dim = torch.export.Dim(f"{name}_dim{axis}", min=bounds[0], max=bounds[1])
                by_symbol[symbol] = (dim, bounds)
            dim, first = by_symbol[symbol]
            if first != bounds:
                raise ValueError(
                    f"input {name!r} dim {axis} shares a size with another input "
                    f"but asks for {bounds}, not {first}"
                )
            axes[axis] = dim
        shapes[name] = axes or None
    return shapes


def input_dim_symbols(program: torch.export.ExportedProgram) -> dict[str, list[str | None]]:
    """For each user input, each dim's symbol when it is exactly one free symbol, else None."""
    user_inputs = set(program.graph_signature.user_inputs)
    symbols: dict[str, list[str | None]] = {}
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        value = node.meta.get("val")
        dims = value.shape if isinstance(value, torch.Tensor) else ()
        symbols[node.name] = [
            str(d.node.expr)
            if isinstance(d, torch.SymInt) and getattr(d.node.expr, "is_Symbol", False)
            else None
            for d in dims
        ]
    return symbols


def _compile_and_save_program(
    program: torch.export.ExportedProgram,
    profile: Sequence[InputProfile],
    inputs: list[Any],
    settings: dict[str, Any],
    artifact: Path,
) -> None:
    import torch_tensorrt
    from torch.export.passes import move_to_device_pass

    # PyTorch fallback ops run where the program's weights are: they must be on the GPU.
    program = move_to_device_pass(program, "cuda")
    compiled = torch_tensorrt.dynamo.compile(
        program,
        arg_inputs=inputs,
        # Kiln was asked for TensorRT: convert every supported op, however small the subgraph.
        min_block_size=1,
        **settings,
    )
    torch_tensorrt.save(
        compiled,
        str(artifact),
        output_format="exported_program",
        arg_inputs=inputs,
        dynamic_shapes=program_dynamic_shapes(program, profile),
        retrace=True,
    )


def _load_program(path: Path) -> Runner:
    import torch_tensorrt

    module = torch_tensorrt.load(str(path)).module()

    def run(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = module(*[t.to("cuda") for t in tensors])
        return list(torch.utils._pytree.tree_leaves(out))

    return run
