"""Serialized plans: what can be checked without a GPU, inspection, and the runner.

Without a GPU the plan cannot be deserialized, so :func:`check_against_request` compares the
request with what the builder held (``BuiltPlan``, read back from TensorRT's objects). On a GPU
the plan itself is read (:func:`describe_engine`) and checked the same way, then run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from workers.backends.base import InputProfile
from workers.backends.tensorrt.builder import OUTPUT_PREFIX, dims, dtype_name
from workers.backends.tensorrt.library import Library

if TYPE_CHECKING:  # the API both libraries share; scripts/typecheck_tensorrt.sh checks it
    import tensorrt_rtx as trt_api

# EngineInvalidityDiagnostics bits (TensorRT-RTX), as users should read them.
_INVALIDITY = {
    1: "built by another TensorRT-RTX version",
    2: "this GPU's compute capability is not one the plan targets",
    4: "the CUDA driver is too old",
    8: "the CUDA runtime is too old",
    16: "not enough GPU memory",
    32: "the plan is malformed",
    64: "a CUDA error",
}


def check_against_request(
    profile: Sequence[InputProfile], inputs: Sequence[dict[str, Any]],
    outputs: Sequence[dict[str, Any]] | None = None, expected_outputs: int | None = None,
) -> list[str]:
    """Where the plan's inputs (``{name, dtype, shape, profile}``) differ from the request.

    ``profile`` may be None for an input with only static dims (an engine reports no profile
    range for those): its shape is then all three points.
    """
    problems = []
    by_name = {i["name"]: i for i in inputs}
    wanted = [p.name for p in profile]
    if sorted(wanted) != sorted(by_name):
        problems.append(f"plan inputs {sorted(by_name)} are not the profile's {sorted(wanted)}")
    for p in profile:
        spec = by_name.get(p.name)
        if spec is None:
            continue
        if spec["dtype"] != p.dtype:
            problems.append(f"input {p.name!r}: plan dtype {spec['dtype']}, asked {p.dtype}")
        asked = {"min": list(p.min), "opt": list(p.opt), "max": list(p.max)}
        got = spec.get("profile") or {point: spec["shape"] for point in asked}
        for point in ("min", "opt", "max"):
            if list(got[point]) != asked[point]:
                problems.append(
                    f"input {p.name!r}: plan {point} {list(got[point])}, asked {asked[point]}")
        for axis, dim in enumerate(spec["shape"]):
            if dim >= 0 and not p.min[axis] == p.max[axis] == dim:
                problems.append(f"input {p.name!r} dim {axis} is fixed at {dim} in the plan")
    if outputs is not None:
        names = [o["name"] for o in outputs]
        if sorted(names) != [f"{OUTPUT_PREFIX}{i}" for i in range(len(names))]:
            problems.append(f"plan outputs {names} are not output0..output{len(names) - 1}")
        if expected_outputs is not None and len(names) != expected_outputs:
            problems.append(f"plan has {len(names)} outputs, the program {expected_outputs}")
    return problems


def invalidity_reason(diagnostics: int) -> str:
    reasons = [text for bit, text in _INVALIDITY.items() if diagnostics & bit]
    return ", ".join(reasons) or f"diagnostics {diagnostics}"


def deserialize(library: Library, trt: ModuleType, plan: bytes
                ) -> tuple[trt_api.Runtime, trt_api.ICudaEngine]:
    """(runtime, engine): the runtime must outlive the engine, so they travel together."""
    runtime: trt_api.Runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    # engine_host_code_allowed stays False: Kiln never builds plans that embed a lean runtime.
    if hasattr(runtime, "get_engine_validity"):  # TensorRT-RTX says why before it tries
        validity, diagnostics = runtime.get_engine_validity(plan)
        if validity.name == "INVALID":
            raise RuntimeError(f"{library.title} cannot load this plan here: "
                               f"{invalidity_reason(int(diagnostics))}")
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:  # what TensorRT returns on a version or device mismatch
        raise RuntimeError(
            f"{library.title} {trt.__version__} could not load the plan: it was built by "
            "another version or for another GPU (see the log above)")
    return runtime, engine


def describe_engine(trt: ModuleType, engine: trt_api.ICudaEngine) -> dict[str, Any]:
    """What a deserialized plan says about itself: I/O names, dtypes, shapes, profile 0."""
    info: dict[str, Any] = {
        "num_optimization_profiles": engine.num_optimization_profiles,
        "hardware_compatibility_level": engine.hardware_compatibility_level.name,
        "device_memory_bytes": engine.device_memory_size_v2,
        "inputs": [], "outputs": [],
    }
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        shape = dims(engine.get_tensor_shape(name))
        entry: dict[str, Any] = {"name": name, "dtype": dtype_name(engine.get_tensor_dtype(name)),
                                 "shape": shape}
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            entry["profile"] = None
            if -1 in shape:
                lo, mid, hi = engine.get_tensor_profile_shape(name, 0)
                entry["profile"] = {"min": dims(lo), "opt": dims(mid), "max": dims(hi)}
            entry["shape_tensor"] = engine.is_shape_inference_io(name)
            info["inputs"].append(entry)
        else:
            info["outputs"].append(entry)
    return info


def _torch_dtype(name: str, dtype: str) -> torch.dtype:
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise NotImplementedError(
            f"plan tensor {name!r} is {dtype}, which the runner cannot hold in a torch tensor")
    return value


def _output_allocator(trt: ModuleType, dtype: torch.dtype) -> Any:
    """An ``IOutputAllocator`` for an output whose shape is known only after it runs."""

    class _Allocator(trt.IOutputAllocator):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.buffer = torch.empty(0, dtype=torch.uint8, device="cuda")
            self.shape: tuple[int, ...] | None = None

        def reallocate_output_async(self, tensor_name: str, memory: int, size: int,
                                    alignment: int, stream: int) -> int:
            if self.buffer.numel() < max(size, 1):
                self.buffer = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
            return int(self.buffer.data_ptr())

        def notify_shape(self, tensor_name: str, shape: Any) -> None:
            self.shape = tuple(int(d) for d in shape)

        def result(self) -> torch.Tensor:
            assert self.shape is not None, "TensorRT ran without reporting the output shape"
            count = 1
            for d in self.shape:
                count *= d
            size = count * torch.empty(0, dtype=dtype).element_size()
            return self.buffer[:size].view(dtype).reshape(self.shape).clone()

    return _Allocator()


class EngineRunner:
    """Runs one plan with one execution context on a private CUDA stream: one call at a time.

    Inputs are taken in the profile's order and outputs returned as ``output0..N-1``, by name:
    TensorRT does not keep I/O tensors in index order.
    """

    def __init__(self, library: Library, trt: ModuleType, artifact: Path,
                 profile: Sequence[InputProfile]) -> None:
        self.trt = trt
        # The runtime and engine must outlive the context, so the runner holds all three.
        self.runtime, self.engine = deserialize(library, trt, Path(artifact).read_bytes())
        info = describe_engine(trt, self.engine)
        shape_tensors = [i["name"] for i in info["inputs"] if i["shape_tensor"]]
        if shape_tensors:
            raise NotImplementedError(
                f"plans with shape-tensor inputs {shape_tensors} are not supported by this runner")
        engine_inputs = [i["name"] for i in info["inputs"]]
        self.input_names = [p.name for p in profile] if profile else sorted(engine_inputs)
        if sorted(self.input_names) != sorted(engine_inputs):
            raise ValueError(f"profile inputs {self.input_names} do not match the plan's "
                             f"inputs {engine_inputs}")
        self.input_dtypes = {i["name"]: _torch_dtype(i["name"], i["dtype"])
                             for i in info["inputs"]}
        by_name = {o["name"]: o for o in info["outputs"]}
        names = [f"{OUTPUT_PREFIX}{i}" for i in range(len(by_name))]
        if sorted(names) != sorted(by_name):
            raise ValueError(f"plan outputs {sorted(by_name)} are not named output0..N-1")
        self.outputs = [(n, _torch_dtype(n, by_name[n]["dtype"]), -1 in by_name[n]["shape"])
                        for n in names]
        context = self.engine.create_execution_context()
        if context is None:  # TensorRT's answer when it cannot allocate the context
            raise RuntimeError("TensorRT could not create an execution context (GPU memory?)")
        self.context: trt_api.IExecutionContext = context
        self.stream = torch.cuda.Stream()

    def _bind(self, name: str, tensor: torch.Tensor, placeholders: list[torch.Tensor]) -> None:
        pointer = tensor.data_ptr()
        if tensor.numel() == 0:  # TensorRT refuses a null address, even for an empty tensor
            placeholders.append(torch.empty(1, dtype=tensor.dtype, device="cuda"))
            pointer = placeholders[-1].data_ptr()
        if not self.context.set_tensor_address(name, pointer):
            raise RuntimeError(f"TensorRT refused the address of tensor {name!r}")

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(tensors) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs, got {len(tensors)}")
        context = self.context
        # The context holds raw addresses: these lists keep the tensors alive until the sync.
        feeds: list[torch.Tensor] = []
        placeholders: list[torch.Tensor] = []
        for name, tensor in zip(self.input_names, tensors, strict=True):
            if tensor.dtype != self.input_dtypes[name]:
                raise TypeError(
                    f"input {name!r} must be {self.input_dtypes[name]}, got {tensor.dtype}")
            tensor = tensor.to("cuda").contiguous()
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(
                    f"input {name!r} shape {tuple(tensor.shape)} is outside the plan's profile")
            self._bind(name, tensor, placeholders)
            feeds.append(tensor)
        unresolved = context.infer_shapes()
        if unresolved:
            raise RuntimeError(f"TensorRT could not infer the shapes of {unresolved}")
        results: list[torch.Tensor | Any] = []
        for name, dtype, _ in self.outputs:
            shape = dims(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):  # data-dependent: TensorRT allocates as it runs
                allocator = _output_allocator(self.trt, dtype)
                if not context.set_output_allocator(name, allocator):
                    raise RuntimeError(f"TensorRT refused an output allocator for {name!r}")
                results.append(allocator)
                continue
            out = torch.empty(shape, dtype=dtype, device="cuda")
            self._bind(name, out, placeholders)
            results.append(out)
        caller = torch.cuda.current_stream()
        # A private stream: enqueueV3 on the legacy default stream adds synchronisations.
        self.stream.wait_stream(caller)
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        caller.wait_stream(self.stream)
        self.stream.synchronize()
        return [r if isinstance(r, torch.Tensor) else r.result() for r in results]
