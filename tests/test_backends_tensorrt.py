"""The TensorRT backends: ``tensorrt`` (standard) and ``tensorrt-rtx`` on one builder.

Three layers:
- pure decisions (options, dtypes, profiles, checks, timing-cache files, capabilities) that run
  everywhere;
- real TensorRT-RTX builds, which run on this CPU-only machine (TensorRT-RTX builds plans ahead
  of time without a GPU); they skip, with the reason, where ``tensorrt_rtx`` does not import;
- running plans, and standard TensorRT, under the ``gpu`` / ``tensorrt`` markers: the same code,
  skipped here with the reason (no GPU; standard TensorRT cannot be installed here).
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.export import Dim

from service.errors import KilnError
from service.targets import BACKENDS, check_dtypes, normalize_options
from workers.backends import BACKEND_NAMES, artifact_suffix, get_backend
from workers.backends import tensorrt as trt_backend
from workers.backends.base import AheadOfTimeBuilder, InputProfile
from workers.backends.tensorrt import timing_cache, torch_frontend
from workers.backends.tensorrt.plan import check_against_request, invalidity_reason

ROOT = Path(__file__).resolve().parents[1]
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed (the "
                               "[tensorrt-rtx] extra)")
HAS_GPU = torch.cuda.is_available()

BATCH = InputProfile("x", "float32", (1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32))
STATIC = InputProfile("scale", "float16", (1, 8), (1, 8), (1, 8))


# ---- pure: options, registry, dtypes -------------------------------------------------------


def test_importing_the_package_imports_no_toolchain():
    code = ("import sys, workers.backends.tensorrt, workers.backends.tensorrt.torch_frontend;"
            "print(sorted(m for m in ('tensorrt', 'tensorrt_rtx', 'torch_tensorrt') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_the_registry_is_the_targets_table():
    assert BACKEND_NAMES == tuple(BACKENDS) and "tensorrt-rtx" in BACKEND_NAMES
    for name in BACKEND_NAMES:
        backend = get_backend(name)
        assert backend.name == name
        assert backend.artifact_suffix == BACKENDS[name]["suffix"] == artifact_suffix(name)
    with pytest.raises(KeyError, match="'tensorrt_rtx'"):
        get_backend("tensorrt_rtx")


def test_rtx_options_default_to_every_supported_gpu_in_one_order():
    assert normalize_options("tensorrt-rtx", "cuda", {}) == {
        "opset": 18, "workspace_mb": None,
        "compute_capabilities": ["sm_80", "sm_86", "sm_89", "sm_120", "sm_121"]}
    # Same set, any order or repeats: the same key.
    assert normalize_options("tensorrt-rtx", "cuda", {
        "compute_capabilities": ["sm_89", "sm_86", "sm_89"]})["compute_capabilities"] == [
        "sm_86", "sm_89"]


@pytest.mark.parametrize(("option", "says"), [
    ("hardware_compatible", "portable across the GPUs named in compute_capabilities"),
    ("version_compatible", "never load in another TensorRT-RTX release"),
    ("optimization_level", "same plan at every optimisation level"),
    ("frontend", "ONNX export only"),
])
def test_rtx_refuses_standard_only_options_with_the_reason(option, says):
    with pytest.raises(KilnError) as err:
        normalize_options("tensorrt-rtx", "cuda", {option: True})
    assert err.value.code == "invalid_options"
    assert f"'{option}' is a standard TensorRT option" in err.value.message
    assert says in err.value.message


def test_rtx_refuses_sm_90_and_the_cpu():
    with pytest.raises(KilnError) as err:
        normalize_options("tensorrt-rtx", "cuda", {"compute_capabilities": ["sm_90"]})
    assert err.value.details["errors"][0]["field"] == "compute_capabilities.0"
    with pytest.raises(KilnError) as err:
        normalize_options("tensorrt-rtx", "cuda", {"compute_capabilities": []})
    with pytest.raises(KilnError) as err:
        normalize_options("tensorrt-rtx", "cpu", {})
    assert err.value.code == "unsupported_device"


def test_standard_options_frontend_and_format():
    options = normalize_options("tensorrt", "cuda", {})
    assert options["frontend"] == "onnx" and options["format"] == "engine"
    with pytest.raises(KilnError, match="needs frontend 'torch_tensorrt'"):
        normalize_options("tensorrt", "cuda", {"format": "exported_program"})
    assert normalize_options("tensorrt", "cuda", {"format": "exported_program",
                                                  "frontend": "torch_tensorrt"})


@pytest.mark.parametrize("dtype", ["float64", "int16", "uint16", "uint32", "complex64",
                                   "float8_e5m2"])
def test_dtypes_tensorrt_cannot_take_are_refused_naming_the_input(dtype):
    profile = [{"name": "x", "dtype": "float32"}, {"name": "ids", "dtype": dtype}]
    for backend in ("tensorrt", "tensorrt-rtx"):
        with pytest.raises(KilnError) as err:
            check_dtypes(backend, profile)
        assert err.value.code == "unsupported_dtype" and err.value.status == 422
        assert f"input 'ids' is {dtype}" in err.value.message
        assert [e["input"] for e in err.value.details["errors"]] == ["ids"]
    check_dtypes("aoti", profile)  # other backends decide for themselves
    check_dtypes("tensorrt", [{"name": "x", "dtype": "bfloat16"}])


def test_profile_problems():
    assert trt_backend.profile_problems([BATCH, STATIC]) == []
    problems = trt_backend.profile_problems([
        InputProfile("a", "float32", (4, 3), (2, 3), (8, 3)),
        InputProfile("b", "float32", (0, 3), (2, 3), (8, 3)),
        InputProfile("c", "float32", (1, 3), (2,), (8, 3)),
    ])
    assert problems == [
        "input 'a' dim 0: need 0 <= min <= opt <= max, got 4, 2, 8",
        "input 'b' dim 0: a dynamic dim cannot start at 0",
        "input 'c': min, opt and max have different ranks",
    ]
    at_one = InputProfile("x", "float32", (1, 3), (1, 3), (8, 3))
    assert trt_backend.profile_problems([at_one], "exported_program") == [
        "input 'x' dim 0: opt must be >= 2 for the exported_program format"]


def test_build_refuses_bad_dtypes_before_touching_a_library(tmp_path):
    bad = InputProfile("x", "float64", (1, 3), (2, 3), (4, 3))
    for name in ("tensorrt", "tensorrt-rtx"):
        with pytest.raises(KilnError) as err:
            get_backend(name).build(None, [bad], "cuda", {}, tmp_path, print)  # type: ignore[arg-type]
        assert err.value.code == "unsupported_dtype"
        with pytest.raises(KilnError) as err:
            get_backend(name).build(None, [BATCH], "cpu", {}, tmp_path, print)  # type: ignore[arg-type]
        assert err.value.code == "unsupported_device"


# ---- pure: checks, capabilities, timing cache, Torch-TensorRT helpers ----------------------


def _plan_inputs() -> list[dict[str, Any]]:
    return [
        {"name": "x", "dtype": "float32", "shape": [-1, 3, 32, 32],
         "profile": {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [16, 3, 32, 32]}},
        {"name": "scale", "dtype": "float16", "shape": [1, 8], "profile": None},
    ]


def test_check_against_request_names_each_difference():
    outputs = [{"name": "output0", "dtype": "float32", "shape": [-1, 10]}]
    assert check_against_request([BATCH, STATIC], _plan_inputs(), outputs, 1) == []
    inputs = _plan_inputs()
    inputs[0]["profile"]["opt"] = [8, 3, 32, 32]
    inputs[1]["dtype"] = "float32"
    assert check_against_request([BATCH, STATIC], inputs, outputs, 2) == [
        "input 'x': plan opt [8, 3, 32, 32], asked [4, 3, 32, 32]",
        "input 'scale': plan dtype float32, asked float16",
        "plan has 1 outputs, the program 2",
    ]
    assert check_against_request([BATCH], _plan_inputs()) == [
        "plan inputs ['scale', 'x'] are not the profile's ['x']"]
    assert check_against_request([BATCH, STATIC], _plan_inputs(),
                                 [{"name": "linear", "dtype": "float32", "shape": [4]}]) == [
        "plan outputs ['linear'] are not output0..output0"]


def test_invalidity_reason_reads_tensorrt_rtx_diagnostics():
    assert invalidity_reason(2) == "this GPU's compute capability is not one the plan targets"
    assert invalidity_reason(1 | 4) == ("built by another TensorRT-RTX version, the CUDA driver "
                                        "is too old")


@needs_rtx
def test_rtx_run_capability_is_honest(monkeypatch):
    backend = get_backend("tensorrt-rtx")
    assert isinstance(backend, AheadOfTimeBuilder)
    monkeypatch.setattr(trt_backend, "gpu_compute_capability", lambda: None)
    assert backend.run_capability().startswith(  # type: ignore[attr-defined]
        "no CUDA GPU on this worker: TensorRT-RTX 1.7.1 builds plans here ahead of time")
    monkeypatch.setattr(trt_backend, "gpu_compute_capability", lambda: "sm_90")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    reason = backend.run_capability()  # type: ignore[attr-defined]
    assert reason.startswith("compute capability 9.0 not supported by TensorRT-RTX 1.7.1 "
                             "(NVIDIA H200; it runs plans on sm_80 sm_86 sm_89 sm_120 sm_121")
    monkeypatch.setattr(trt_backend, "gpu_compute_capability", lambda: "sm_86")
    assert backend.run_capability() is None  # type: ignore[attr-defined]
    # A plan built for Ada only does not run on an A10.
    built = trt_backend.BuildResult(Path("x"), {"compute_capabilities": ["sm_89"]})
    reason = backend.cannot_run_reason(built, "cuda")
    assert reason is not None and "this plan targets sm_89" in reason


def test_timing_cache_file_is_per_gpu_model_and_tensorrt_version(tmp_path, monkeypatch):
    path = timing_cache.timing_cache_file(tmp_path, "NVIDIA H100 80GB HBM3", "sm_90", "10.15.1")
    assert path == tmp_path / "nvidia-h100-80gb-hbm3-sm_90-trt10.15.1.cache"
    monkeypatch.setenv("KILN_TRT_TIMING_CACHE_DIR", str(tmp_path / "tc"))
    assert timing_cache.timing_cache_dir() == tmp_path / "tc"


def test_timing_cache_file_errors_of_any_kind_mean_a_cold_cache(tmp_path):
    lines: list[str] = []
    assert timing_cache.read(tmp_path / "missing.cache", lines.append) is None
    assert lines == []  # a first build is not an error
    assert timing_cache.read(tmp_path, lines.append) is None  # a directory: IsADirectoryError
    assert lines and "building cold: IsADirectoryError" in lines[0]
    (tmp_path / "ok.cache").write_bytes(b"cache")
    assert timing_cache.read(tmp_path / "ok.cache", lines.append) == b"cache"


def test_timing_cache_merge_combines_and_never_fails_the_build(tmp_path):
    shared = tmp_path / "shared" / "gpu.cache"
    assert timing_cache.merge(shared, b"first", lambda a, b: a + b, print) is True
    assert timing_cache.merge(shared, b"+ours", lambda a, b: a + b, print) is True
    assert shared.read_bytes() == b"first+ours"
    assert sorted(p.name for p in shared.parent.iterdir()) == ["gpu.cache", "gpu.cache.lock"]

    def broken(a: bytes, b: bytes) -> bytes:
        raise RuntimeError("no GPU here")

    lines: list[str] = []
    assert timing_cache.merge(shared, b"x", broken, lines.append) is False
    assert shared.read_bytes() == b"first+ours"
    assert lines == ["timing cache not saved: RuntimeError: no GPU here"]
    readonly = tmp_path / "ro"
    readonly.mkdir()
    (readonly / "gpu.cache.lock").mkdir()  # the lock cannot be opened: OSError
    assert timing_cache.merge(readonly / "gpu.cache", b"x", broken, lines.append) is False


def test_torch_tensorrt_inputs_and_settings(tmp_path):
    assert torch_frontend.profile_to_inputs([BATCH, STATIC]) == [
        {"name": "x", "dtype": torch.float32, "min_shape": (1, 3, 32, 32),
         "opt_shape": (4, 3, 32, 32), "max_shape": (16, 3, 32, 32)},
        {"name": "scale", "dtype": torch.float16, "shape": (1, 8)},
    ]
    options = normalize_options("tensorrt", "cuda", {"frontend": "torch_tensorrt",
                                                     "workspace_mb": 512})
    settings = torch_frontend.torch_tensorrt_settings(options, tmp_path / "t.cache")
    assert settings["workspace_size"] == 512 * 2**20
    assert settings["timing_cache_path"] == str(tmp_path / "t.cache")
    assert "enabled_precisions" not in settings  # precision follows the program's dtypes


def test_converter_errors_reach_the_job_not_unbound_local_error():
    errors: list[str] = []
    lines: list[str] = []
    with torch_frontend.forward_logs({"kiln.test.tt": logging.WARNING}, lines.append, errors):
        try:
            raise NotImplementedError("aten.nonzero has no converter")
        except NotImplementedError:
            logging.getLogger("kiln.test.tt.conv").exception("Conversion of node failed")
    assert "aten.nonzero has no converter" in lines[0]  # the traceback reaches the build log
    err = torch_frontend.conversion_error(
        UnboundLocalError("cannot access local variable 'interpreter_result'"), errors)
    assert err.code == "conversion_failed"
    assert err.message == "Torch-TensorRT could not convert the program: Conversion of node failed"
    assert "aten.nonzero has no converter" in err.details["logged"][0]
    assert "UnboundLocalError" in err.details["raised"]


class Twice(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = torch.relu(x)
        return y, y * 2, y


def test_distinct_outputs_gives_a_repeated_output_its_own_tensor():
    program = torch.export.export(Twice(), (torch.randn(2, 4),))
    assert torch_frontend.distinct_outputs(program) == 1
    output = next(n for n in program.graph.nodes if n.op == "output")
    assert len({id(v) for v in output.args[0]}) == 3
    assert [s.arg.name for s in program.graph_signature.output_specs] == [
        v.name for v in output.args[0]]
    x = torch.randn(2, 4)
    a, b, c = program.module()(x)
    assert torch.equal(a, c) and torch.equal(b, a * 2)


class TwoInputs(torch.nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1) * mask.mean(dim=1, keepdim=True) + bias


@pytest.fixture(scope="module")
def shared_batch_program() -> torch.export.ExportedProgram:
    batch, seq = Dim("batch", min=1, max=32), Dim("seq", min=2, max=64)
    return torch.export.export(
        TwoInputs(), (torch.randn(2, 5, 8), torch.randn(2, 5), torch.randn(8)),
        dynamic_shapes={"x": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}, "bias": None})


SHARED = [InputProfile("x", "float32", (1, 2, 8), (4, 16, 8), (8, 64, 8)),
          InputProfile("mask", "float32", (1, 2), (4, 16), (8, 64)),
          InputProfile("bias", "float32", (8,), (8,), (8,))]


def test_program_dynamic_shapes_share_one_dim_per_program_symbol(shared_batch_program):
    shapes = torch_frontend.program_dynamic_shapes(shared_batch_program, SHARED)
    x, mask = shapes["x"], shapes["mask"]
    assert shapes["bias"] is None and x is not None and mask is not None
    assert x[0] is mask[0] and x[1] is mask[1]
    profile = [*SHARED]
    profile[1] = InputProfile("mask", "float32", (1, 2), (4, 16), (4, 64))
    with pytest.raises(ValueError, match="shares a size with another input"):
        torch_frontend.program_dynamic_shapes(shared_batch_program, profile)


def test_standard_tensorrt_says_why_it_is_unavailable():
    reason = get_backend("tensorrt").unavailable_reason()
    if importlib.util.find_spec("tensorrt") is None:
        assert reason == ("tensorrt is not importable: ModuleNotFoundError: No module named "
                          "'tensorrt'")
    elif not HAS_GPU:
        assert reason is not None and "no CUDA GPU" in reason


# ---- real TensorRT-RTX builds on this machine (CPU-only mode) ------------------------------


def _convnet() -> torch.export.ExportedProgram:
    sys.path.insert(0, str(ROOT / "examples"))
    from export_convnet import ConvNet

    torch.manual_seed(0)
    return torch.export.export(ConvNet().eval(), (torch.randn(4, 3, 32, 32),),
                               dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}})


class TwoOutputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.proj(x)
        return h.softmax(-1), h.sum(-1), h.softmax(-1)


def _rtx_build(program: torch.export.ExportedProgram, profile: list[InputProfile],
               workdir: Path, **options: Any) -> tuple[Any, list[str]]:
    lines: list[str] = []
    backend = get_backend("tensorrt-rtx")
    built = backend.build(program, profile, "cuda",
                          normalize_options("tensorrt-rtx", "cuda", options), workdir,
                          lines.append)
    return built, lines


@pytest.fixture(scope="module")
def convnet_plan(tmp_path_factory):
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx is not installed (the [tensorrt-rtx] extra)")
    program = _convnet()
    built, lines = _rtx_build(program, [BATCH], tmp_path_factory.mktemp("convnet"))
    return program, built, lines


@needs_rtx
def test_rtx_builds_the_convnet_with_a_dynamic_batch_here(convnet_plan):
    _, built, _ = convnet_plan
    assert built.artifact.name == "model.engine" and built.artifact.stat().st_size > 10_000
    plan = built.artifact.read_bytes()
    assert plan[:4] == b"vtrt"  # a TensorRT-RTX plan, not the ONNX file
    report = built.report
    assert report["format"] == "engine" and report["frontend"] == "onnx"
    assert report["library"] == "tensorrt_rtx=1.7.1"
    assert report["compute_capabilities"] == ["sm_80", "sm_86", "sm_89", "sm_120", "sm_121"]
    assert report["toolchain"]["tensorrt_rtx"] == "1.7.1"
    assert report["toolchain"]["compute_capabilities"] == "sm_80+sm_86+sm_89+sm_120+sm_121"


@needs_rtx
def test_the_profile_inside_the_plan_is_the_request(convnet_plan):
    _, built, _ = convnet_plan
    (x,) = built.report["plan"]["inputs"]
    assert x == {"name": "x", "dtype": "float32", "shape": [-1, 3, 32, 32],
                 "profile": {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32],
                             "max": [16, 3, 32, 32]}}
    assert built.report["plan"]["outputs"] == [
        {"name": "output0", "dtype": "float32", "shape": [-1, 10]}]


@needs_rtx
@pytest.mark.skipif(HAS_GPU, reason="this host has a GPU")
def test_a_cpu_only_worker_says_it_cannot_run_the_plan(convnet_plan):
    _, built, lines = convnet_plan
    assert "no CUDA GPU: TensorRT-RTX builds in CPU-only mode" in lines
    reason = get_backend("tensorrt-rtx").cannot_run_reason(built, "cuda")  # type: ignore[attr-defined]
    assert reason == ("no CUDA GPU on this worker: TensorRT-RTX 1.7.1 builds plans here ahead "
                      "of time but cannot run them; they run on sm_80, sm_86, sm_89, sm_120, "
                      "sm_121")


@needs_rtx
def test_rtx_compute_capabilities_change_the_plan(convnet_plan, tmp_path):
    program, default, _ = convnet_plan
    ada, _ = _rtx_build(program, [BATCH], tmp_path, compute_capabilities=["sm_89"])
    assert ada.report["compute_capabilities"] == ["sm_89"]
    assert ada.artifact.read_bytes() != default.artifact.read_bytes()


@needs_rtx
def test_rtx_two_inputs_with_shared_dynamic_dims(shared_batch_program, tmp_path):
    built, _ = _rtx_build(shared_batch_program, SHARED, tmp_path)
    inputs = {i["name"]: i for i in built.report["plan"]["inputs"]}
    assert set(inputs) == {"x", "mask", "bias"}
    for p in SHARED:
        assert inputs[p.name]["profile"] == {"min": list(p.min), "opt": list(p.opt),
                                             "max": list(p.max)}
    assert inputs["bias"]["shape"] == [8]


@needs_rtx
def test_rtx_program_with_several_outputs_one_returned_twice(tmp_path):
    program = torch.export.export(TwoOutputs().eval(), (torch.randn(2, 8),),
                                  dynamic_shapes={"x": {0: Dim("batch", min=1, max=16)}})
    profile = [InputProfile("x", "float32", (1, 8), (4, 8), (16, 8))]
    built, _ = _rtx_build(program, profile, tmp_path)
    assert [(o["name"], o["shape"]) for o in built.report["plan"]["outputs"]] == [
        ("output0", [-1, 4]), ("output1", [-1]), ("output2", [-1, 4])]


@needs_rtx
def test_rtx_refuses_a_float64_input_before_building(tmp_path):
    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    program = torch.export.export(Double(), (torch.randn(2, 3, dtype=torch.float64),))
    with pytest.raises(KilnError) as err:
        _rtx_build(program, [InputProfile("x", "float64", (2, 3), (2, 3), (2, 3))], tmp_path)
    assert err.value.code == "unsupported_dtype" and "input 'x' is float64" in err.value.message
    assert not (tmp_path / "onnx").exists()  # refused before the export


@needs_rtx
def test_onnx_parse_errors_name_the_node():
    import onnx
    from onnx import TensorProto, helper

    from workers.backends.tensorrt.builder import parse_onnx
    from workers.backends.tensorrt.library import RTX, import_library

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="node_relu"),
         helper.make_node("FancyOp", ["r"], ["y"], name="node_fancy", domain="kiln.test")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("kiln.test", 1)])
    trt = import_library(RTX)
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    with pytest.raises(KilnError) as err:
        parse_onnx(trt, trt.Builder(logger), logger, model.SerializeToString())
    assert err.value.code == "onnx_parse_failed" and err.value.status == 422
    assert err.value.message.startswith(
        "TensorRT's ONNX parser refused the model: ONNX node 'node_fancy' (FancyOp): ")
    assert err.value.details["errors"][0]["node"] == "node_fancy"
    assert onnx.__version__


@needs_rtx
def test_probe_announces_build_but_not_run_without_a_supported_gpu():
    from workers.probe import probe

    (target,) = probe(["tensorrt-rtx"])["targets"]
    assert target["backend"] == "tensorrt-rtx" and target["device"] == "cuda"
    assert target["arch"] == "sm_80+sm_86+sm_89+sm_120+sm_121"
    assert "tensorrt_rtx=1.7.1" in target["toolchain_id"]
    assert "compute_capabilities=sm_80+sm_86+sm_89+sm_120+sm_121" in target["toolchain_id"]
    assert target["builds"] is True
    if not HAS_GPU:
        assert target["runs"] is False and "no CUDA GPU" in target["runs_reason"]


# ---- running plans: a GPU the plan targets (gpu), standard TensorRT (tensorrt) -------------


def _compare_with_eager(program, runner, profile, rtol=1e-2, atol=1e-2):
    for point in ("min", "opt", "max"):
        inputs = [torch.randn(getattr(p, point)) for p in profile]
        expected = program.module()(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = runner([t.cuda() for t in inputs])
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g.cpu(), e, rtol=rtol, atol=atol)


@pytest.mark.gpu
@needs_rtx
def test_rtx_plan_runs_like_eager_on_a_gpu_it_targets(convnet_plan):
    program, built, _ = convnet_plan
    backend = get_backend("tensorrt-rtx")
    reason = backend.cannot_run_reason(built, "cuda")  # type: ignore[attr-defined]
    if reason:
        pytest.skip(reason)
    _compare_with_eager(program, backend.load(built.artifact, "cuda", [BATCH]), [BATCH])


@pytest.fixture(scope="module")
def trt_gpu_host() -> None:
    reason = get_backend("tensorrt").unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.tensorrt
def test_standard_tensorrt_onnx_route_runs_like_eager(trt_gpu_host, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_TRT_TIMING_CACHE_DIR", str(tmp_path / "tc"))
    program, backend = _convnet(), get_backend("tensorrt")
    options = normalize_options("tensorrt", "cuda", {})
    built = backend.build(program, [BATCH], "cuda", options, tmp_path / "a", print)
    assert built.report["library"].startswith("tensorrt=")
    assert built.report["timing_cache"]["saved"] is True
    _compare_with_eager(program, backend.load(built.artifact, "cuda", [BATCH]), [BATCH])
    again = backend.build(program, [BATCH], "cuda", options, tmp_path / "b", print)
    assert again.report["timing_cache"]["warm"] is True


@pytest.mark.tensorrt
def test_standard_tensorrt_torch_tensorrt_route_with_repeated_outputs(trt_gpu_host, tmp_path):
    backend = get_backend("tensorrt")
    if "torch_tensorrt" not in backend.frontends():  # type: ignore[attr-defined]
        pytest.skip("torch_tensorrt does not import here")
    program = torch.export.export(TwoOutputs().eval().cuda(), (torch.randn(2, 8).cuda(),),
                                  dynamic_shapes={"x": {0: Dim("batch", min=1, max=16)}})
    profile = [InputProfile("x", "float32", (1, 8), (4, 8), (16, 8))]
    options = normalize_options("tensorrt", "cuda", {"frontend": "torch_tensorrt"})
    built = backend.build(program, profile, "cuda", options, tmp_path, print)
    assert len(built.report["engine"]["outputs"]) == 3
    _compare_with_eager(program, backend.load(built.artifact, "cuda", profile), profile)
