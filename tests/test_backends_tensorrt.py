"""The TensorRT backend.

Two layers: pure decisions (profile translation, builder settings, cache key, timing-cache
files, engine checks) that run everywhere; and real builds, marked ``tensorrt``, that run only
where ``import tensorrt`` works and a CUDA GPU is present (design.md section 6: TensorRT cannot
be installed on the development and CI machines).
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch.export import Dim

from service.errors import KilnError
from workers.backends import tensorrt as trt_backend
from workers.backends.base import InputProfile
from workers.backends.tensorrt import TensorRTBackend

OPTIONS = {
    "optimization_level": 3,
    "workspace_mb": None,
    "hardware_compatible": False,
    "version_compatible": False,
    "format": "engine",
}
H100 = {
    "torch": "2.13.0",
    "tensorrt": "11.0.0.1",
    "torch_tensorrt": "2.13.0",
    "cuda": "13.0",
    "compute_capability": "sm_90",
    "gpu": "NVIDIA H100 80GB HBM3",
}
BATCH = InputProfile("x", "float32", (1, 3, 16, 16), (4, 3, 16, 16), (16, 3, 16, 16))
STATIC = InputProfile("scale", "float16", (1, 8), (1, 8), (1, 8))


# ---- pure: no tensorrt, no GPU ---------------------------------------------------------------


def test_importing_the_module_imports_no_toolchain():
    if importlib.util.find_spec("tensorrt") is None:
        assert "tensorrt" not in sys.modules
        assert "torch_tensorrt" not in sys.modules


def test_profile_to_inputs_dynamic_and_static():
    assert trt_backend.profile_to_inputs([BATCH, STATIC]) == [
        {
            "name": "x",
            "dtype": torch.float32,
            "min_shape": (1, 3, 16, 16),
            "opt_shape": (4, 3, 16, 16),
            "max_shape": (16, 3, 16, 16),
        },
        {"name": "scale", "dtype": torch.float16, "shape": (1, 8)},
    ]


def test_profile_to_inputs_refuses_unknown_dtypes():
    with pytest.raises(ValueError, match="'float42' is not a torch dtype"):
        trt_backend.profile_to_inputs([InputProfile("x", "float42", (1,), (1,), (1,))])
    with pytest.raises(ValueError, match="'Tensor' is not a torch dtype"):
        trt_backend.torch_dtype("Tensor")


def test_check_profile():
    assert trt_backend.check_profile([BATCH, STATIC]) == []
    problems = trt_backend.check_profile(
        [
            InputProfile("a", "float32", (4, 3), (2, 3), (8, 3)),
            InputProfile("b", "float32", (0, 3), (2, 3), (8, 3)),
            InputProfile("c", "float32", (1, 3), (2,), (8, 3)),
            InputProfile("d", "bfloat17", (1,), (1,), (1,)),
        ]
    )
    assert problems == [
        "input 'a' dim 0: need 0 <= min <= opt <= max, got 4, 2, 8",
        "input 'b' dim 0: a dynamic dim cannot start at 0",
        "input 'c': min, opt and max have different ranks",
        "input 'd': 'bfloat17' is not a torch dtype",
    ]


def test_exported_program_format_refuses_opt_of_one_on_a_dynamic_dim():
    at_one = InputProfile("x", "float32", (1, 3), (1, 3), (8, 3))
    assert trt_backend.check_profile([at_one], "engine") == []
    assert trt_backend.check_profile([at_one], "exported_program") == [
        "input 'x' dim 0: opt must be >= 2 for the exported_program format"
    ]


def test_torch_tensorrt_settings():
    settings = trt_backend.torch_tensorrt_settings(OPTIONS)
    assert settings == {
        "optimization_level": 3,
        "hardware_compatible": False,
        "version_compatible": False,
        "disable_tf32": False,
        "cache_built_engines": False,
        "reuse_cached_engines": False,
        "immutable_weights": True,
    }
    # No enabled_precisions: Torch-TensorRT >= 2.13 has none; precision follows the program.
    settings = trt_backend.torch_tensorrt_settings(
        {**OPTIONS, "workspace_mb": 512, "hardware_compatible": True, "version_compatible": True}
    )
    assert settings["workspace_size"] == 512 * 2**20
    assert settings["hardware_compatible"] and settings["version_compatible"]


def test_key_toolchain_relaxes_the_gpu_only_for_hardware_compatible_engines():
    assert trt_backend.key_toolchain(H100, OPTIONS) == H100
    portable = trt_backend.key_toolchain(H100, {**OPTIONS, "hardware_compatible": True})
    assert portable["compute_capability"] == portable["gpu"] == "ampere_plus"
    a100 = {**H100, "compute_capability": "sm_80", "gpu": "NVIDIA A100-SXM4-40GB"}
    assert trt_backend.key_toolchain(a100, {**OPTIONS, "hardware_compatible": True}) == portable
    # Version compatibility keeps the exact TensorRT version (see the module docstring).
    assert trt_backend.key_toolchain(H100, {**OPTIONS, "version_compatible": True}) == H100


@pytest.mark.parametrize(
    ("cc", "expected"),
    [("sm_75", False), ("sm_80", True), ("sm_86", True), ("sm_90", True), ("sm_100", True),
     ("sm_120", True), ("gfx90a", False)],
)
def test_is_ampere_plus(cc, expected):
    assert trt_backend.is_ampere_plus(cc) is expected


def test_timing_cache_file_is_per_gpu_model_and_tensorrt_version(tmp_path, monkeypatch):
    path = trt_backend.timing_cache_file(tmp_path, H100)
    assert path == tmp_path / "nvidia-h100-80gb-hbm3-sm_90-trt11.0.0.1.cache"
    assert trt_backend.timing_cache_file(tmp_path, {**H100, "tensorrt": "11.1.0.1"}) != path

    monkeypatch.setenv("KILN_TRT_TIMING_CACHE_DIR", str(tmp_path / "tc"))
    assert trt_backend.timing_cache_dir() == tmp_path / "tc"
    monkeypatch.delenv("KILN_TRT_TIMING_CACHE_DIR")
    assert trt_backend.timing_cache_dir() == Path("~/.cache/kiln/trt-timing").expanduser()


def test_merge_timing_cache_first_build_writes_the_shared_file(tmp_path):
    shared, built = tmp_path / "shared" / "gpu.cache", tmp_path / "build.cache"
    lines: list[str] = []
    assert trt_backend.merge_timing_cache(shared, built, lines.append) is False  # nothing built
    built.write_bytes(b"first")
    assert trt_backend.merge_timing_cache(shared, built, lines.append) is True
    assert shared.read_bytes() == b"first"
    # Only the cache and its lock file: the temporary file was renamed into place.
    assert sorted(p.name for p in shared.parent.iterdir()) == ["gpu.cache", "gpu.cache.lock"]


def test_merge_timing_cache_combines_with_what_others_saved(tmp_path, monkeypatch):
    shared, built = tmp_path / "gpu.cache", tmp_path / "build.cache"
    shared.write_bytes(b"theirs")
    built.write_bytes(b"ours")
    monkeypatch.setattr(
        trt_backend, "_combine_timing_caches", lambda shared, ours, log: shared + b"+" + ours
    )
    assert trt_backend.merge_timing_cache(shared, built, print) is True
    assert shared.read_bytes() == b"theirs+ours"


def test_merge_timing_cache_failure_keeps_the_shared_file_and_the_build(tmp_path, monkeypatch):
    shared, built = tmp_path / "gpu.cache", tmp_path / "build.cache"
    shared.write_bytes(b"theirs")
    built.write_bytes(b"ours")

    def broken(shared: bytes, ours: bytes, log: object) -> bytes:
        raise RuntimeError("no GPU here")

    monkeypatch.setattr(trt_backend, "_combine_timing_caches", broken)
    lines: list[str] = []
    assert trt_backend.merge_timing_cache(shared, built, lines.append) is False
    assert shared.read_bytes() == b"theirs"
    assert lines == ["timing cache not saved: RuntimeError: no GPU here"]


def _engine_info(**overrides):
    info = {
        "hardware_compatibility_level": "NONE",
        "inputs": [
            {
                "name": "x",
                "dtype": "float32",
                "shape": [-1, 3, 16, 16],
                "profile": {"min": [1, 3, 16, 16], "opt": [4, 3, 16, 16], "max": [16, 3, 16, 16]},
                "shape_tensor": False,
            },
            {"name": "scale", "dtype": "float16", "shape": [1, 8], "profile": None,
             "shape_tensor": False},
        ],
        "outputs": [{"name": "output0", "dtype": "float32", "shape": [-1, 4]}],
    }
    info.update(overrides)
    return info


def test_check_engine_against_request_accepts_the_engine_asked_for():
    assert trt_backend.check_engine_against_request([BATCH, STATIC], OPTIONS, _engine_info()) == []


def test_check_engine_against_request_names_each_difference():
    info = _engine_info()
    info["inputs"][0]["profile"]["opt"] = [8, 3, 16, 16]
    info["inputs"][1]["dtype"] = "float32"
    problems = trt_backend.check_engine_against_request(
        [BATCH, STATIC], {**OPTIONS, "hardware_compatible": True}, info
    )
    assert problems == [
        "input 'x': engine opt [8, 3, 16, 16], asked [4, 3, 16, 16]",
        "input 'scale': engine dtype float32, asked float16",
        "engine hardware compatibility is NONE, asked AMPERE_PLUS",
    ]
    assert trt_backend.check_engine_against_request([BATCH], OPTIONS, _engine_info()) == [
        "engine inputs ['scale', 'x'] are not the profile's ['x']"
    ]


class TwoInputs(torch.nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1) * mask.mean(dim=1, keepdim=True) + bias


@pytest.fixture(scope="module")
def shared_batch_program() -> torch.export.ExportedProgram:
    batch, seq = Dim("batch", min=1, max=32), Dim("seq", min=2, max=64)
    return torch.export.export(
        TwoInputs(),
        (torch.randn(2, 5, 8), torch.randn(2, 5), torch.randn(8)),
        dynamic_shapes={"x": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}, "bias": None},
    )


def test_input_dim_symbols(shared_batch_program):
    symbols = trt_backend.input_dim_symbols(shared_batch_program)
    assert list(symbols) == ["x", "mask", "bias"]
    assert symbols["x"][:2] == symbols["mask"] and None not in symbols["mask"]
    assert symbols["x"][2] is None and symbols["bias"] == [None]


def test_program_dynamic_shapes_share_one_dim_per_program_symbol(shared_batch_program):
    profile = [
        InputProfile("x", "float32", (1, 2, 8), (4, 16, 8), (8, 64, 8)),
        InputProfile("mask", "float32", (1, 2), (4, 16), (8, 64)),
        InputProfile("bias", "float32", (8,), (8,), (8,)),
    ]
    shapes = trt_backend.program_dynamic_shapes(shared_batch_program, profile)
    assert shapes["bias"] is None
    assert set(shapes["x"]) == {0, 1} and set(shapes["mask"]) == {0, 1}
    assert shapes["x"][0] is shapes["mask"][0] and shapes["x"][1] is shapes["mask"][1]
    assert (shapes["x"][0].min, shapes["x"][0].max) == (1, 8)

    profile[1] = InputProfile("mask", "float32", (1, 2), (4, 16), (4, 64))
    with pytest.raises(ValueError, match="shares a size with another input"):
        trt_backend.program_dynamic_shapes(shared_batch_program, profile)


def test_forward_logs_sends_records_to_the_build_log():
    lines: list[str] = []
    levels = {"kiln.test.lib": logging.INFO, "kiln test trt": logging.WARNING}
    with trt_backend.forward_logs(levels, lines.append):
        logging.getLogger("kiln.test.lib.child").info("building %s", "engine")
        logging.getLogger("kiln test trt").info("layer chatter")
        logging.getLogger("kiln test trt").warning("weights look odd")
    logging.getLogger("kiln.test.lib.child").info("after")
    assert lines == ["info: building engine", "warning: weights look odd"]
    assert logging.getLogger("kiln.test.lib").level == logging.NOTSET


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here"
)
def test_unavailable_reason_is_clear_without_tensorrt():
    backend = TensorRTBackend()
    reason = backend.unavailable_reason()
    assert reason is not None and reason.startswith("tensorrt is not importable: ")
    assert "No module named 'tensorrt'" in reason
    assert backend.devices() == []


def test_build_refuses_non_cuda_devices_before_touching_tensorrt(tmp_path):
    with pytest.raises(KilnError) as err:
        TensorRTBackend().build(None, [BATCH], "cpu", OPTIONS, tmp_path, print)
    assert err.value.code == "unsupported_device"
    with pytest.raises(ValueError, match="runs on 'cuda'"):
        TensorRTBackend().load(tmp_path / "model.engine", "cpu", [BATCH])


# ---- real builds: TensorRT and a CUDA GPU ----------------------------------------------------


@pytest.fixture(scope="module")
def trt_host() -> None:
    reason = "TensorRT cannot be installed on this machine (design.md section 6)"
    pytest.importorskip("tensorrt", reason=reason)
    pytest.importorskip("torch_tensorrt", reason=reason)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(y.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def conv_program(trt_host) -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    program = torch.export.export(
        ConvNet().eval(),
        (torch.randn(4, 3, 16, 16),),
        dynamic_shapes={"x": {0: Dim("batch", min=1, max=32)}},
    )
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program, "cuda")  # as the build child does for cuda jobs


@pytest.fixture(scope="module")
def timing_cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("trt-timing")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_TRT_TIMING_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def built_engine(conv_program, timing_cache_dir, tmp_path_factory):
    lines: list[str] = []
    workdir = tmp_path_factory.mktemp("engine")
    result = TensorRTBackend().build(conv_program, [BATCH], "cuda", OPTIONS, workdir, lines.append)
    return result, lines


def _compare_with_eager(program, runner, profile, rtol=1e-2, atol=1e-2):
    # Tolerances allow TF32, which TensorRT (like eager convolutions) may use for float32.
    for point in ("min", "opt", "max"):
        torch.manual_seed(1)
        x = torch.randn(getattr(profile[0], point), device="cuda")
        expected = program.module()(x)
        (got,) = runner([x])
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


@pytest.mark.tensorrt
def test_engine_runs_like_eager_at_min_opt_max(conv_program, built_engine):
    result, _ = built_engine
    assert result.artifact.name == "model.engine"
    runner = TensorRTBackend().load(result.artifact, "cuda", [BATCH])
    _compare_with_eager(conv_program, runner, [BATCH])
    with pytest.raises(ValueError, match="outside the engine's profile"):
        runner([torch.randn(64, 3, 16, 16, device="cuda")])


@pytest.mark.tensorrt
def test_inspect_engine_reports_the_requested_profile(built_engine):
    result, _ = built_engine
    info = trt_backend.inspect_engine(result.artifact)
    (x,) = info["inputs"]
    assert x["name"] == "x" and x["dtype"] == "float32"
    assert x["profile"] == {"min": [1, 3, 16, 16], "opt": [4, 3, 16, 16], "max": [16, 3, 16, 16]}
    assert info["num_optimization_profiles"] == 1
    assert result.report["engine"] == info
    assert result.report["format"] == "engine" and result.report["artifact_suffix"] == ".engine"


@pytest.mark.tensorrt
def test_toolchain_names_the_gpu_and_tensorrt(trt_host):
    toolchain = TensorRTBackend().toolchain("cuda")
    major, minor = torch.cuda.get_device_capability()
    assert toolchain["compute_capability"] == f"sm_{major}{minor}"
    assert toolchain["tensorrt"] and toolchain["torch_tensorrt"] and toolchain["gpu"]


@pytest.mark.tensorrt
def test_timing_cache_is_saved_and_warms_the_next_build(
    conv_program, built_engine, timing_cache_dir, tmp_path
):
    result, _ = built_engine
    shared = Path(result.report["timing_cache"]["path"])
    assert shared.parent == timing_cache_dir and shared.stat().st_size > 0
    assert result.report["timing_cache"]["saved"] is True
    again = TensorRTBackend().build(conv_program, [BATCH], "cuda", OPTIONS, tmp_path, print)
    assert again.report["timing_cache"]["warm"] is True


@pytest.mark.tensorrt
def test_hardware_compatible_engine_says_so(conv_program, timing_cache_dir, tmp_path):
    if not trt_backend.is_ampere_plus(TensorRTBackend().toolchain("cuda")["compute_capability"]):
        pytest.skip("needs an Ampere or later GPU")
    options = {**OPTIONS, "hardware_compatible": True}
    result = TensorRTBackend().build(conv_program, [BATCH], "cuda", options, tmp_path, print)
    assert result.report["engine"]["hardware_compatibility_level"] == "AMPERE_PLUS"


@pytest.mark.tensorrt
def test_exported_program_format(conv_program, timing_cache_dir, tmp_path):
    options = {**OPTIONS, "format": "exported_program"}
    result = TensorRTBackend().build(conv_program, [BATCH], "cuda", options, tmp_path, print)
    assert result.artifact.name == "model.pt2"
    assert result.report["artifact_suffix"] == ".pt2"
    runner = TensorRTBackend().load(result.artifact, "cuda", [BATCH])
    _compare_with_eager(conv_program, runner, [BATCH])
