"""The Torch-TensorRT frontend: Torch-TensorRT converts the program itself (standard TensorRT).

For hosts where ``torch_tensorrt`` imports (it initialises CUDA at import, so GPU hosts only).
Two formats: ``engine``, a serialized plan from Torch-TensorRT's
``convert_exported_program_to_serialized_trt_engine``
(run by the same runner as the ONNX route), and ``exported_program``, a Torch-TensorRT compiled
program (.pt2) with PyTorch fallback for what TensorRT cannot convert.

What this module does that Torch-TensorRT 2.11 does not:
- ``torch_tensorrt`` is imported before ``tensorrt`` (``library.import_library``).
- Converter errors: 2.11 logs them and then fails with ``UnboundLocalError``; the records are
  captured with their tracebacks and become the job's error (``conversion_failed``).
- A program that returns one tensor twice: Torch-TensorRT marks it once, so the plan would have
  fewer outputs than the program. Repeats get their own ``clone`` first (:func:`distinct_outputs`).
- Outputs are bound by their names ``output0..N-1`` by the runner, not by engine index.
- The timing cache file Torch-TensorRT rewrites is a private copy, merged back like the ONNX
  route's (``timing_cache``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from service.errors import KilnError
from workers.backends.base import BuildResult, InputProfile, Runner
from workers.backends.tensorrt import timing_cache
from workers.backends.tensorrt.library import STANDARD, import_library, import_torch_tensorrt
from workers.backends.tensorrt.plan import check_against_request, describe_engine, deserialize

PROGRAM_SUFFIX = ".pt2"

# Torch-TensorRT logs through "torch_tensorrt.*"; TensorRT's own messages reach Python through
# a logger outside that hierarchy. Its INFO is one line per FX node: keep warnings only.
TORCH_TENSORRT_LOGS = {
    "torch_tensorrt": logging.WARNING,
    "torch_tensorrt [TensorRT Conversion Context]": logging.WARNING,
}


def profile_to_inputs(profile: Sequence[InputProfile]) -> list[dict[str, Any]]:
    """Each profile input as ``torch_tensorrt.Input`` keyword arguments, in profile order.

    A fully static input is given as ``shape`` so Torch-TensorRT treats it as static rather
    than as a one-point range.
    """
    inputs = []
    for p in profile:
        dtype = getattr(torch, p.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{p.dtype!r} is not a torch dtype")
        kwargs: dict[str, Any] = {"name": p.name, "dtype": dtype}
        if p.min == p.opt == p.max:
            kwargs["shape"] = tuple(p.min)
        else:
            kwargs.update(min_shape=tuple(p.min), opt_shape=tuple(p.opt), max_shape=tuple(p.max))
        inputs.append(kwargs)
    return inputs


def torch_tensorrt_settings(options: dict[str, Any], cache_path: Path) -> dict[str, Any]:
    """Torch-TensorRT 2.11 keyword arguments for the backend's options (TensorRTOptions)."""
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
        "timing_cache_path": str(cache_path),
    }
    if options.get("workspace_mb") is not None:
        settings["workspace_size"] = int(options["workspace_mb"]) * 2**20
    return settings


def distinct_outputs(program: torch.export.ExportedProgram) -> int:
    """Give each repeated user output its own ``clone``, in place; return how many.

    TensorRT marks a tensor as an output once, so a program returning ``(y, y)`` would get a
    one-output plan. The clone costs a copy of that output only.
    """
    graph = program.graph
    output = next(n for n in graph.nodes if n.op == "output")
    values = list(output.args[0])
    specs = program.graph_signature.output_specs
    seen: set[Any] = set()
    added = 0
    for index, value in enumerate(values):
        if not isinstance(value, torch.fx.Node):
            continue
        if value in seen or value.op == "placeholder":
            with graph.inserting_before(output):
                copy = graph.call_function(torch.ops.aten.clone.default, (value,))
            copy.meta = dict(value.meta)
            values[index] = copy
            arg = specs[index].arg
            if hasattr(arg, "name"):
                arg.name = copy.name
            added += 1
        seen.add(value)
    if added:
        output.args = (tuple(values),)
        graph.lint()
        program.graph_module.recompile()
    return added


@contextlib.contextmanager
def forward_logs(levels: dict[str, int], log: Callable[[str], None],
                 errors: list[str] | None = None) -> Iterator[None]:
    """Send log records of the named loggers, from the given levels, to the build log.

    ERROR records (with their tracebacks) are also kept in ``errors``: Torch-TensorRT 2.11
    logs a converter's failure and raises something unrelated.
    """

    class _Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                text += "\n" + record.exc_text
            log(f"{record.levelname.lower()}: {text}")
            if errors is not None and record.levelno >= logging.ERROR:
                errors.append(text)

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


def conversion_error(exc: Exception, errors: list[str]) -> KilnError:
    """The job's error for a failed conversion: what Torch-TensorRT logged, not what it raised."""
    logged = "; ".join(e.splitlines()[0] for e in errors[-3:])
    message = (f"Torch-TensorRT could not convert the program: {logged}" if logged else
               f"Torch-TensorRT could not convert the program: {type(exc).__name__}: {exc}")
    return KilnError("conversion_failed", message[:2000], status=422,
                     details={"logged": [e[:4000] for e in errors[-5:]],
                              "raised": f"{type(exc).__name__}: {exc}"[:2000],
                              "hint": "try frontend 'onnx', or format 'exported_program' for "
                                      "PyTorch fallback"})


def build(
    program: torch.export.ExportedProgram,
    profile: Sequence[InputProfile],
    options: dict[str, Any],
    toolchain: dict[str, str],
    workdir: Path,
    log: Callable[[str], None],
) -> BuildResult:
    torch_tensorrt = import_torch_tensorrt()
    trt = import_library(STANDARD)
    fmt = options.get("format", "engine")
    workdir = Path(workdir)
    cloned = distinct_outputs(program)
    if cloned:
        log(f"{cloned} repeated program output(s) get their own copy")
    # list[Any]: Torch-TensorRT annotates arg_inputs as Sequence[Sequence[Any]], yet its
    # documented use (and this one) passes Input objects.
    inputs: list[Any] = [torch_tensorrt.Input(**kw) for kw in profile_to_inputs(profile)]
    shared = timing_cache.timing_cache_file(timing_cache.timing_cache_dir(), toolchain["gpu"],
                                            toolchain["compute_capability"], toolchain["tensorrt"])
    private = workdir / "timing.cache"
    warm = timing_cache.read(shared, log)
    if warm is not None:
        private.write_bytes(warm)
    settings = torch_tensorrt_settings(options, private)
    errors: list[str] = []
    try:
        with forward_logs(TORCH_TENSORRT_LOGS, log, errors):
            if fmt == "engine":
                plan = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
                    program, arg_inputs=inputs, **settings)
                if plan is None:
                    raise RuntimeError("Torch-TensorRT returned no plan")
                artifact = workdir / "model.engine"
                artifact.write_bytes(bytes(plan))
            else:
                artifact = workdir / f"model{PROGRAM_SUFFIX}"
                _compile_and_save_program(program, profile, inputs, settings, artifact)
    except KilnError:
        raise
    except Exception as exc:
        raise conversion_error(exc, errors) from exc
    saved = private.exists() and timing_cache.merge(
        shared, private.read_bytes(), timing_cache.combiner(trt, log), log)
    report: dict[str, Any] = {
        "format": fmt, "frontend": "torch_tensorrt", "artifact_suffix": artifact.suffix,
        "library": f"tensorrt={toolchain['tensorrt']}", "size_bytes": artifact.stat().st_size,
        "toolchain": toolchain,
        "builder": {k: v for k, v in settings.items() if k != "timing_cache_path"},
        "precision": "strongly typed: layer dtypes follow the program's dtypes",
        "timing_cache": {"path": str(shared), "warm": warm is not None, "saved": saved},
    }
    if fmt == "engine":
        _, engine = deserialize(STANDARD, trt, artifact.read_bytes())
        info = describe_engine(trt, engine)
        report["engine"] = info
        problems = check_against_request(profile, info["inputs"], info["outputs"],
                                         len(program.graph_signature.user_outputs))
        if options.get("hardware_compatible") and \
                info["hardware_compatibility_level"] != "AMPERE_PLUS":
            problems.append(f"engine hardware compatibility is "
                            f"{info['hardware_compatibility_level']}, asked AMPERE_PLUS")
        if problems:
            raise KilnError("engine_mismatch", "the built engine is not the one requested: "
                            + "; ".join(problems), status=500, details={"problems": problems})
    else:
        # dynamo.compile takes the engine's opt from the program's example sizes and its
        # min/max from range_constraints, not from Input: opt is then only a hint.
        report["profile_note"] = ("opt is the program's export-time example size; min/max may "
                                  "be the program's range_constraints")
    return BuildResult(artifact=artifact, report=report)


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
    torch_tensorrt = import_torch_tensorrt()
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


def load_program(path: Path) -> Runner:
    torch_tensorrt = import_torch_tensorrt()

    module = torch_tensorrt.load(str(path)).module()

    def run(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = module(*[t.to("cuda") for t in tensors])
        return list(torch.utils._pytree.tree_leaves(out))

    return run
