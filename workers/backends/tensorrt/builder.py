"""One builder over the TensorRT Python API, for standard TensorRT and TensorRT-RTX alike.

ONNX bytes in, serialized plan out: ``OnnxParser`` fills a strongly typed network (layer
precisions follow the program's dtypes, so no precision flag is needed), one optimisation
profile carries the request's (min, opt, max) for every input, the builder config carries the
options, and ``build_serialized_network`` returns the plan. This is what
``trtexec --onnx --minShapes/--optShapes/--maxShapes`` does.

Outputs are renamed ``output0..N-1`` in the program's output order (TensorRT stores I/O tensors
in no particular order, so runners bind by these names), and an output the program returns
twice gets its own identity copy, so the plan has one tensor per program output.

What the builder was given is read back from TensorRT's own objects (the profile's
``get_shape`` per input, the network's I/O names, dtypes and shapes) and returned with the plan:
a plan deserializes only on a GPU it targets, so on any other host this is what can be checked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from service.errors import KilnError
from workers.backends.base import InputProfile
from workers.backends.tensorrt.library import Library

if TYPE_CHECKING:  # the API both libraries share; scripts/typecheck_tensorrt.sh checks it
    import tensorrt_rtx as trt_api

# Keyed by ``trt.DataType.name`` so the table needs no tensorrt import.
TRT_TO_TORCH_DTYPE: dict[str, str] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
    "FP8": "float8_e4m3fn",
}

OUTPUT_PREFIX = "output"


@dataclass(frozen=True)
class BuildSettings:
    """The builder config Kiln sets, from the backend's options."""

    optimization_level: int | None = None  # None: the library's default
    workspace_bytes: int | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX: "sm_86", ...; () = default
    timing_cache: bytes | None = None  # standard TensorRT: a serialized cache to start from
    use_timing_cache: bool = False


@dataclass
class BuiltPlan:
    plan: bytes
    # As TensorRT holds them after the build: names, dtypes (torch names), shapes (-1 dynamic)
    # and, for inputs, the profile's (min, opt, max) read back with ``get_shape``.
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    timing_cache: bytes | None = None
    warnings: list[str] = field(default_factory=list)


def dims(value: Any) -> list[int]:
    """A ``trt.Dims`` as a list (it indexes, but does not declare itself iterable)."""
    return [int(value[i]) for i in range(len(value))]


def host_bytes(memory: Any) -> bytes:
    """An ``IHostMemory`` (a buffer) as bytes."""
    return bytes(memoryview(memory))


def dtype_name(trt_dtype: Any) -> str:
    return TRT_TO_TORCH_DTYPE.get(trt_dtype.name, trt_dtype.name)


def make_logger(trt: ModuleType, log: Callable[[str], None], errors: list[str]) -> Any:
    """A TensorRT logger that writes warnings and errors to the build log and keeps errors."""

    class _Logger(trt.ILogger):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                errors.append(msg)
            if severity <= trt.ILogger.Severity.WARNING:
                log(f"[{'E' if severity <= trt.ILogger.Severity.ERROR else 'W'}] {msg}")

    return _Logger()


def parse_onnx(trt: ModuleType, builder: trt_api.Builder, logger: trt_api.ILogger,
               onnx_bytes: bytes) -> trt_api.INetworkDefinition:
    """A strongly typed network from ONNX bytes; a parse failure names the ONNX nodes."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser: trt_api.OnnxParser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        problems = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            problems.append({
                "node": err.node_name() or None, "operator": err.node_operator() or None,
                "node_index": err.node() if err.node() >= 0 else None,
                "code": err.code().name, "message": err.desc()})
        where = "; ".join(
            (f"ONNX node {p['node']!r} ({p['operator']}): " if p["node"] else "") + p["message"]
            for p in problems) or "the parser gave no reason"
        raise KilnError("onnx_parse_failed", f"TensorRT's ONNX parser refused the model: {where}",
                        status=422, details={"errors": problems})
    # The parser must outlive nothing after parse: the network holds what it built.
    return network


def name_outputs(network: trt_api.INetworkDefinition) -> None:
    """Rename outputs ``output0..N-1``; give a repeated or passed-through output its own copy."""
    tensors = [network.get_output(i) for i in range(network.num_outputs)]
    for tensor in tensors:  # marked again below, in order: TensorRT appends marked outputs
        network.unmark_output(tensor)
    taken: set[str] = set()
    for index, tensor in enumerate(tensors):
        if tensor.name in taken or tensor.is_network_input:
            tensor = network.add_identity(tensor).get_output(0)
        taken.add(tensor.name)
        tensor.name = f"{OUTPUT_PREFIX}{index}"
        taken.add(tensor.name)
        network.mark_output(tensor)


def build_plan(
    library: Library,
    trt: ModuleType,
    onnx_bytes: bytes,
    profile: Sequence[InputProfile],
    settings: BuildSettings,
    log: Callable[[str], None],
) -> BuiltPlan:
    errors: list[str] = []
    logger = make_logger(trt, log, errors)
    builder: trt_api.Builder = trt.Builder(logger)
    network = parse_onnx(trt, builder, logger, onnx_bytes)
    name_outputs(network)
    config = builder.create_builder_config()
    trt_profile = builder.create_optimization_profile()
    by_name = {p.name: p for p in profile}
    network_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    missing = sorted(set(by_name) - {t.name for t in network_inputs})
    unprofiled = [t.name for t in network_inputs if t.name not in by_name]
    if missing or unprofiled:
        raise KilnError("engine_mismatch", "the ONNX graph's inputs are not the profile's",
                        status=500, details={"not_in_graph": missing, "not_in_profile": unprofiled})
    for tensor in network_inputs:
        p = by_name[tensor.name]
        if tensor.is_shape_tensor:
            raise KilnError("unsupported_program", f"input {tensor.name!r} is a shape tensor, "
                            "which Kiln's TensorRT runner does not feed", status=422)
        trt_profile.set_shape(tensor.name, p.min, p.opt, p.max)
    config.add_optimization_profile(trt_profile)
    _configure(library, trt, config, settings)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise KilnError("build_failed", f"{library.title} could not build the plan: "
                        + ("; ".join(errors[-5:]) or "no reason logged"), status=500,
                        details={"errors": errors[-20:]})
    inputs = []
    for tensor in network_inputs:
        lo, mid, hi = trt_profile.get_shape(tensor.name)
        inputs.append({"name": tensor.name, "dtype": dtype_name(tensor.dtype),
                       "shape": dims(tensor.shape),
                       "profile": {"min": dims(lo), "opt": dims(mid), "max": dims(hi)}})
    outputs = [{"name": t.name, "dtype": dtype_name(t.dtype), "shape": dims(t.shape)}
               for t in (network.get_output(i) for i in range(network.num_outputs))]
    cache = None
    if settings.use_timing_cache:
        cache = host_bytes(config.get_timing_cache().serialize())
    return BuiltPlan(plan=host_bytes(plan), inputs=inputs, outputs=outputs,
                     timing_cache=cache)


def _configure(library: Library, trt: ModuleType, config: trt_api.IBuilderConfig,
               s: BuildSettings) -> None:
    if s.optimization_level is not None:
        config.builder_optimization_level = s.optimization_level
    if s.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_bytes)
    if s.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if s.version_compatible:
        # Without EXCLUDE_LEAN_RUNTIME the plan embeds a lean runtime Kiln never allows to run.
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    if s.compute_capabilities:
        config.num_compute_capabilities = len(s.compute_capabilities)
        for index, cc in enumerate(s.compute_capabilities):
            member = getattr(trt.ComputeCapability, cc.replace("sm_", "SM"))
            if not config.set_compute_capability(member, index):
                raise KilnError("invalid_options", f"{library.title} refused compute "
                                f"capability {cc}", status=422)
    if s.use_timing_cache:
        cache = config.create_timing_cache(s.timing_cache or b"")
        # ignore_mismatch=False: never use entries from another device or TensorRT version.
        config.set_timing_cache(cache, False)
