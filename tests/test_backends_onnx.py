"""The ONNX backend end to end: real exports, real onnxruntime sessions, compared with eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.export import Dim

from service.errors import KilnError
from workers.backends import onnx as onnx_backend
from workers.backends.base import InputProfile
from workers.backends.onnx import OnnxBackend

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

OPTIONS = {"opset": 18, "optimize": True}


class SmallConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(y)


class EncoderWithMask(torch.nn.Module):
    """Two inputs sharing the batch symbol, one of them also dynamic in sequence length."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, batch_first=True
        )

    def forward(self, src: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.layer(src) * scale[:, None, :]


def _build(program, profile, tmp_path, options=OPTIONS):
    lines: list[str] = []
    result = OnnxBackend().build(program, profile, "cpu", options, tmp_path, lines.append)
    return result, lines


def _inputs_at(profile: list[InputProfile], point: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(getattr(p, point)) for p in profile]


def _assert_runs_like_eager(program, profile, artifact: Path) -> None:
    runner = OnnxBackend().load(artifact, "cpu", profile)
    for point in ("min", "opt", "max"):
        inputs = _inputs_at(profile, point)
        expected = program.module()(*inputs)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        got = runner(inputs)
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def conv_program() -> torch.export.ExportedProgram:
    model = SmallConvNet().eval()
    batch = Dim("batch", min=1, max=16)
    return torch.export.export(
        model, (torch.randn(4, 3, 8, 8),), dynamic_shapes={"x": {0: batch}}
    )


@pytest.fixture(scope="module")
def encoder_program() -> torch.export.ExportedProgram:
    model = EncoderWithMask().eval()
    batch, seq = Dim("batch", min=1, max=8), Dim("seq", min=2, max=32)
    return torch.export.export(
        model,
        (torch.randn(2, 5, 16), torch.randn(2, 16)),
        dynamic_shapes={"src": {0: batch, 1: seq}, "scale": {0: batch}},
    )


CONV_PROFILE = [InputProfile("x", "float32", (1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))]
ENCODER_PROFILE = [
    InputProfile("src", "float32", (1, 2, 16), (4, 12, 16), (8, 32, 16)),
    InputProfile("scale", "float32", (1, 16), (4, 16), (8, 16)),
]


def test_conv_net_with_dynamic_batch(conv_program, tmp_path):
    result, lines = _build(conv_program, CONV_PROFILE, tmp_path)

    assert result.artifact == tmp_path / "model.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no external data file
    report = result.report
    assert report["opset"] == 18
    assert set(report["versions"]) == {"torch", "onnx", "onnxscript", "onnxruntime"}
    assert report["inputs"] == [{"name": "x", "dtype": "float32", "dims": ["x_dim0", 3, 8, 8]}]
    assert report["outputs"][0]["dims"] == ["x_dim0", 4]
    assert report["node_count"] > 0
    assert any("Translate the graph into ONNX" in line for line in lines)
    _assert_runs_like_eager(conv_program, CONV_PROFILE, result.artifact)


@pytest.fixture(scope="module")
def encoder_build(encoder_program, tmp_path_factory):
    result, _ = _build(encoder_program, ENCODER_PROFILE, tmp_path_factory.mktemp("encoder"))
    return result


def test_encoder_with_two_dynamic_dims_and_a_shared_one(encoder_program, encoder_build):
    import onnx

    result = encoder_build

    # Read the file itself, not only the report: the dims must be dim_params, not numbers.
    model = onnx.load(str(result.artifact))
    stored = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in model.graph.input
    }
    assert stored == {"src": ["src_dim0", "src_dim1", 16], "scale": ["src_dim0", 16]}
    _assert_runs_like_eager(encoder_program, ENCODER_PROFILE, result.artifact)


def test_runner_takes_inputs_in_profile_order(encoder_build):
    result = encoder_build
    with pytest.raises(ValueError, match="do not match the ONNX graph inputs"):
        OnnxBackend().load(result.artifact, "cpu", [ENCODER_PROFILE[0]])
    runner = OnnxBackend().load(result.artifact, "cpu", ENCODER_PROFILE)
    with pytest.raises(ValueError, match="expected 2 inputs"):
        runner([torch.randn(1, 2, 16)])


def test_profile_beyond_a_static_dim_is_refused(conv_program, tmp_path):
    profile = [InputProfile("x", "float32", (1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 16, 16))]
    with pytest.raises(KilnError) as err:
        _build(conv_program, profile, tmp_path)
    assert err.value.code == "profile_not_served"
    assert "dim 2 is fixed at 8" in err.value.details["problems"][0]


def test_weights_over_the_protobuf_limit_are_refused(conv_program, monkeypatch):
    monkeypatch.setattr(onnx_backend, "weights_bytes", lambda program: 3 * 2**30)
    with pytest.raises(KilnError) as err:
        onnx_backend.check_fits_in_one_file(conv_program)
    assert err.value.code == "model_too_large"
    assert "2 GiB" in err.value.message


def test_weights_bytes_counts_parameters(conv_program):
    expected = sum(p.numel() * 4 for p in SmallConvNet().parameters())
    assert onnx_backend.weights_bytes(conv_program) == expected


def test_check_profile_against_onnx_reports_each_problem():
    inputs = [{"name": "x", "dtype": "float32", "dims": ["x_dim0", 3]}]
    problems = onnx_backend.check_profile_against_onnx(
        [
            InputProfile("x", "float16", (1, 3), (2, 3), (4, 3)),
            InputProfile("y", "float32", (1,), (1,), (1,)),
        ],
        inputs,
    )
    assert problems == [
        "input 'x': profile dtype float16, ONNX float32",
        "input 'y' is not an input of the ONNX graph",
    ]


def test_availability_and_toolchain():
    backend = OnnxBackend()
    assert backend.unavailable_reason() is None
    assert backend.devices()[0] == "cpu"
    assert backend.toolchain("cpu")["torch"] == torch.__version__
