"""ONNX export: a module calling ms_deform_attn exports to standard operators only (no custom ops), and
onnxruntime reproduces PyTorch's output."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_inputs
from onnx_helpers import export, operators, run_onnxruntime

import rtdetrv2_kernels

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SHAPES = [(4, 8), (8, 2), (3, 5)]  # non-square both ways
POINTS = [3, 6, 3]


class Attention(torch.nn.Module):
    def __init__(self, method, fused=False):
        super().__init__()
        self.method, self.fused = method, fused

    def forward(self, value, locations, weights):
        if self.fused:  # locations and weights stand for the offsets and logits; boxes come from the logits
            reference = torch.sigmoid(weights[:, :, :1, :4])  # (B, Q, 1, 4)
            return rtdetrv2_kernels.ms_deform_attn_fused(value, SHAPES, reference, locations, weights, POINTS,
                                                         method=self.method)
        return rtdetrv2_kernels.ms_deform_attn(value, SHAPES, locations, weights, POINTS, method=self.method)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("method", ["default", "discrete"])
def test_export_is_standard_onnx_and_matches(method, fused):
    inputs = make_inputs(batch=2, queries=5, heads=2, channels=4, shapes=SHAPES, points=POINTS,
                         dtype=torch.float32, seed=3, borders=False)
    module = Attention(method, fused)
    model = export(module, inputs)
    onnx.checker.check_model(model)
    ops = operators(model)
    assert {domain for domain, _ in ops} == {"ai.onnx"}, f"non-standard operators: {sorted(ops)}"
    names = {name for _, name in ops}
    if method == "default":
        assert "GridSample" in names
    else:  # for engines without GridSample
        assert "GridSample" not in names and names & {"Gather", "GatherElements", "GatherND"}
    expected = module(*inputs)
    (actual,) = run_onnxruntime(model, inputs)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_torchscript_exporter_at_opset_16(method, tmp_path):
    """The older TorchScript-based exporter (dynamo=False), at GridSample's first opset."""
    inputs = make_inputs(batch=2, queries=5, heads=2, channels=4, shapes=SHAPES, points=POINTS,
                         dtype=torch.float32, seed=6, borders=False)
    module = Attention(method).eval()
    path = tmp_path / "attention.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=16)
    model = onnx.load(str(path))
    assert [(entry.domain, entry.version) for entry in model.opset_import] == [("", 16)]
    ops = operators(model)
    assert {domain for domain, _ in ops} == {"ai.onnx"}
    assert (("ai.onnx", "GridSample") in ops) == (method == "default")
    assert (run_onnxruntime(model, inputs)[0] - module(*inputs)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_calls_outside_export_still_run_the_kernel(fused, monkeypatch):
    """The export check must not divert normal calls: the C++ kernel runs, before and after an export (which
    runs the reference instead)."""
    from rtdetrv2_kernels import backends

    if backends.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("the C++ kernels are not built")
    table = backends._FUSED_IMPLEMENTATIONS if fused else backends._IMPLEMENTATIONS
    calls = []
    for name in ("cpu", "torch"):
        run = table[name]
        monkeypatch.setitem(table, name, lambda *args, _name=name, _run=run: calls.append(_name) or _run(*args))
    inputs = make_inputs(batch=1, queries=3, heads=2, channels=4, shapes=SHAPES, points=POINTS,
                         dtype=torch.float32, borders=False)
    module = Attention("default", fused)
    module(*inputs)
    export(module, inputs)
    module(*inputs)
    assert calls == ["cpu", "torch", "cpu"]


def test_export_with_dynamic_batch_and_queries():
    inputs = make_inputs(batch=2, queries=5, heads=2, channels=4, shapes=SHAPES, points=POINTS,
                         dtype=torch.float32, seed=4, borders=False)
    batch, queries = torch.export.Dim("batch"), torch.export.Dim("queries")
    model = export(Attention("default"), inputs,
                   dynamic_shapes=({0: batch}, {0: batch, 1: queries}, {0: batch, 1: queries}))
    other = make_inputs(batch=3, queries=7, heads=2, channels=4, shapes=SHAPES, points=POINTS,
                        dtype=torch.float32, seed=5, borders=False)
    assert (run_onnxruntime(model, other)[0] - Attention("default")(*other)).abs().max().item() <= 1e-4
