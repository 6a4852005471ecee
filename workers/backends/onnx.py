"""The ONNX backend: an exported program as one self-contained ``.onnx`` file, run by ONNX Runtime.

The file keeps the program's dynamic dims as named ``dim_param``s (``<input>_dim<axis>``, shared
by every input that shares the program's symbol), so one file serves every shape in the
program's range; the profile is only checked against it, never baked in. Weights are stored
inside the file: an artifact is a single blob with one sha256, which rules out models whose
weights do not fit protobuf's 2 GiB message limit.
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from service.errors import KilnError
from workers.backends.base import BuildResult, InputProfile, Runner

# protobuf refuses to serialise a message of 2 GiB or more; the graph itself needs some room.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
GRAPH_HEADROOM_BYTES = 64 * 2**20

_REQUIRED_MODULES = ("onnx", "onnxscript", "onnxruntime")

_ONNX_TO_TORCH_DTYPE = {
    "FLOAT": "float32",
    "FLOAT16": "float16",
    "BFLOAT16": "bfloat16",
    "DOUBLE": "float64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "BOOL": "bool",
    "COMPLEX64": "complex64",
    "COMPLEX128": "complex128",
    "FLOAT8E4M3FN": "float8_e4m3fn",
    "FLOAT8E5M2": "float8_e5m2",
}


class OnnxBackend:
    name = "onnx"
    artifact_suffix = ".onnx"

    def unavailable_reason(self) -> str | None:
        for module in _REQUIRED_MODULES:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                return f"{module} is not importable: {exc}"
        return None

    def devices(self) -> list[str]:
        if self.unavailable_reason() is not None:
            return []
        import onnxruntime

        devices = ["cpu"]
        if (
            torch.cuda.is_available()
            and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        ):
            devices.append("cuda")
        return devices

    def toolchain(self, device: str) -> dict[str, str]:
        # The .onnx file is the same for every device; onnxscript is listed because it holds
        # the aten-to-ONNX translations, so a new version can change the graph.
        import onnx
        import onnxruntime
        import onnxscript

        return {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__,
        }

    def build(
        self,
        program: torch.export.ExportedProgram,
        profile: Sequence[InputProfile],
        device: str,
        options: dict[str, Any],
        workdir: Path,
        log: Callable[[str], None],
    ) -> BuildResult:
        import onnx

        check_fits_in_one_file(program)
        artifact = Path(workdir) / f"model{self.artifact_suffix}"
        progress = io.StringIO()
        # The exporter prints its progress to stdout; keep it in the build log instead.
        with contextlib.redirect_stdout(progress):
            torch.onnx.export(
                program,
                args=(),
                f=str(artifact),
                dynamo=True,
                opset_version=options["opset"],
                optimize=options["optimize"],
                dynamic_shapes=dim_names(program),
                external_data=False,
            )
        for line in progress.getvalue().splitlines():
            log(line)

        model = onnx.load(str(artifact), load_external_data=False)
        opset = default_opset(model)
        if opset != options["opset"]:
            # The exporter falls back to its own opset when conversion fails; an artifact
            # keyed as opset N must be opset N.
            raise KilnError(
                "onnx_opset_conversion_failed",
                f"the exporter could not produce opset {options['opset']} (got {opset}); "
                f"choose opset {opset} or later",
                status=422,
                details={"requested": options["opset"], "produced": opset},
            )
        external = [t.name for t in model.graph.initializer if t.data_location == t.EXTERNAL]
        if external:
            raise KilnError(
                "onnx_external_data",
                "the exported ONNX model keeps weights outside the file",
                status=500,
                details={"initializers": external[:10]},
            )
        inputs = [_value_info(v) for v in model.graph.input]
        problems = check_profile_against_onnx(profile, inputs)
        if problems:
            raise KilnError(
                "profile_not_served",
                "the exported ONNX model does not accept the requested shape profile",
                status=422,
                details={"problems": problems},
            )
        report = {
            "format": "onnx",
            "opset": opset,
            "optimized": bool(options["optimize"]),
            "versions": self.toolchain(device),
            "inputs": inputs,
            "outputs": [_value_info(v) for v in model.graph.output],
            "node_count": len(model.graph.node),
            "function_count": len(model.functions),
            "size_bytes": artifact.stat().st_size,
        }
        return BuildResult(artifact=artifact, report=report)

    def load(self, artifact: Path, device: str, profile: Sequence[InputProfile]) -> Runner:
        import onnxruntime

        if device == "cpu":
            providers = ["CPUExecutionProvider"]
        elif device == "cuda":
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise RuntimeError(
                    "onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu)"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            raise ValueError(f"the onnx backend runs on 'cpu' or 'cuda', not {device!r}")
        session_options = onnxruntime.SessionOptions()
        session_options.log_severity_level = 3  # errors only: warnings would flood build logs
        session = onnxruntime.InferenceSession(
            str(artifact), sess_options=session_options, providers=providers
        )
        input_names = feed_order([i.name for i in session.get_inputs()], profile)
        output_names = [o.name for o in session.get_outputs()]
        target = torch.device(device)

        def run(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            if len(tensors) != len(input_names):
                raise ValueError(f"expected {len(input_names)} inputs, got {len(tensors)}")
            feeds = {name: _to_numpy(name, t) for name, t in zip(input_names, tensors, strict=True)}
            results = session.run(output_names, feeds)
            return [torch.from_numpy(r).to(target) for r in results]

        return run


def dim_names(program: torch.export.ExportedProgram) -> dict[str, dict[int, str] | None]:
    """Names for the program's dynamic input dims, as ``torch.onnx.export``'s ``dynamic_shapes``.

    For an ExportedProgram the exporter ignores ``dynamic_shapes`` for tracing and only uses
    the strings to rename the ``dim_param``s it would otherwise call ``s17``: names that
    change between torch versions and say nothing. Each symbol is named after its first
    occurrence; later occurrences get ``None`` so the exporter does not warn about a second
    name for the same symbol (they still carry the first name in the file).
    """
    names: dict[str, dict[int, str] | None] = {}
    seen: set[str] = set()
    for input_name, shape in _user_input_shapes(program):
        axes: dict[int, str] = {}
        for axis, size in enumerate(shape):
            symbol = _plain_symbol(size)
            if symbol is None or symbol in seen:
                continue
            seen.add(symbol)
            axes[axis] = f"{input_name}_dim{axis}"
        names[input_name] = axes or None
    return names


def check_fits_in_one_file(program: torch.export.ExportedProgram) -> None:
    """Refuse programs whose weights cannot be embedded in a single .onnx file."""
    size = weights_bytes(program)
    limit = PROTOBUF_LIMIT_BYTES - GRAPH_HEADROOM_BYTES
    if size > limit:
        raise KilnError(
            "model_too_large",
            f"the model's weights ({size / 2**30:.2f} GiB) do not fit in one ONNX file "
            f"(protobuf's limit is 2 GiB); use the tensorrt or aoti backend",
            status=422,
            details={"weights_bytes": size, "limit_bytes": limit},
        )


def weights_bytes(program: torch.export.ExportedProgram) -> int:
    tensors = list(program.state_dict.values()) + list(program.constants.values())
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def default_opset(model: Any) -> int | None:
    """The version of the default (``ai.onnx``) domain a ModelProto imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def check_profile_against_onnx(
    profile: Sequence[InputProfile], inputs: Sequence[dict[str, Any]]
) -> list[str]:
    """What in ``profile`` the ONNX graph inputs (as in the build report) cannot accept."""
    by_name = {i["name"]: i for i in inputs}
    problems = []
    for p in profile:
        spec = by_name.get(p.name)
        if spec is None:
            problems.append(f"input {p.name!r} is not an input of the ONNX graph")
            continue
        if spec["dtype"] != p.dtype:
            problems.append(f"input {p.name!r}: profile dtype {p.dtype}, ONNX {spec['dtype']}")
        dims = spec["dims"]
        if len(dims) != len(p.min):
            problems.append(f"input {p.name!r}: profile rank {len(p.min)}, ONNX rank {len(dims)}")
            continue
        for axis, (dim, lo, hi) in enumerate(zip(dims, p.min, p.max, strict=True)):
            if isinstance(dim, int) and not lo == hi == dim:
                problems.append(
                    f"input {p.name!r} dim {axis} is fixed at {dim} in the ONNX graph, "
                    f"but the profile asks for {lo}..{hi}"
                )
    return problems


def feed_order(session_inputs: list[str], profile: Sequence[InputProfile]) -> list[str]:
    """The session input names in the order runners receive tensors (the profile's order)."""
    if not profile:
        return session_inputs
    wanted = [p.name for p in profile]
    if sorted(wanted) != sorted(session_inputs):
        raise ValueError(
            f"profile inputs {wanted} do not match the ONNX graph inputs {session_inputs}"
        )
    return wanted


def _user_input_shapes(
    program: torch.export.ExportedProgram,
) -> list[tuple[str, Sequence[Any]]]:
    user_inputs = set(program.graph_signature.user_inputs)
    shapes: list[tuple[str, Sequence[Any]]] = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta.get("val")
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
            shapes.append((node.name, shape))
    return shapes


def _plain_symbol(size: Any) -> str | None:
    """The symbol's name when a dim is exactly one free symbol (not ``2*s0``, not a number)."""
    if not isinstance(size, torch.SymInt):
        return None
    expr = size.node.expr
    return str(expr) if getattr(expr, "is_Symbol", False) else None


def _value_info(value: Any) -> dict[str, Any]:
    """A graph input or output as stored: dims are ints, or the dim_param's name."""
    tensor_type = value.type.tensor_type
    dims: list[int | str | None] = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)  # an unnamed unknown dim
    return {"name": value.name, "dtype": _torch_dtype_name(tensor_type.elem_type), "dims": dims}


def _torch_dtype_name(elem_type: int) -> str:
    """An ONNX element type as the torch dtype name profiles use ("float32", "int64", ...)."""
    import onnx

    name = onnx.TensorProto.DataType.Name(elem_type)
    return _ONNX_TO_TORCH_DTYPE.get(name, name.lower())


def _to_numpy(name: str, tensor: torch.Tensor) -> Any:
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16, and onnxruntime's Python API feeds numpy arrays.
        raise TypeError(f"input {name!r}: bfloat16 inputs are not supported by the onnx runner")
    return tensor.detach().cpu().contiguous().numpy()
