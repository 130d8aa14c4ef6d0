"""ONNX export: a module calling ms_deform_attn exports to standard operators only (no custom ops), bilinear
sampling as corner gathers (the default) or GridSample (rtdetrv2_kernels.export_options), and two runtimes
nobody here wrote, onnxruntime and OpenVINO, reproduce PyTorch's output."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from helpers import make_inputs
from onnx_helpers import export, export_at, operators, run_onnxruntime, run_openvino

import rtdetrv2_kernels

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("openvino")
RUNTIMES = {"onnxruntime": run_onnxruntime, "openvino": run_openvino}
# (method, bilinear form): the discrete method has no bilinear sampling to write.
FORMS = [("default", "gather"), ("default", "grid_sample"), ("discrete", "gather")]

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


def check_operators(model, method, bilinear):
    """Standard operators only; GridSample exactly where asked for, corner gathers otherwise."""
    onnx.checker.check_model(model)
    ops = operators(model)
    assert {domain for domain, _ in ops} == {"ai.onnx"}, f"non-standard operators: {sorted(ops)}"
    names = {name for _, name in ops}
    grid_sample = method == "default" and bilinear == "grid_sample"
    assert ("GridSample" in names) == grid_sample, sorted(names)
    if not grid_sample:  # (the TorchScript exporter also gathers from shapes, so their absence proves nothing)
        assert names & {"Gather", "GatherElements", "GatherND"}, sorted(names)


def assert_matches(actual, expected, what):
    assert actual.shape == expected.shape, what
    error = (actual - expected).abs().max().item()
    assert error <= 1e-5 * max(1.0, expected.abs().max().item()), f"{what}: max error {error:.3g}"


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
@pytest.mark.parametrize("opset", [17, None], ids=["opset17", "default-opset"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("method,bilinear", FORMS, ids=[f"{m}-{b}" for m, b in FORMS])
def test_export_matches_in_onnxruntime_and_openvino(method, bilinear, fused, opset, dynamic, tmp_path):
    inputs = make_inputs(batch=2, queries=5, heads=2, channels=4, shapes=SHAPES, points=POINTS,
                         dtype=torch.float32, seed=3, borders=False)
    module = Attention(method, fused)
    model = export_at(module, inputs, tmp_path, opset=opset, dynamic_batch=dynamic, bilinear=bilinear)
    check_operators(model, method, bilinear)
    runs = [inputs]
    if dynamic:
        runs.append(make_inputs(batch=3, queries=5, heads=2, channels=4, shapes=SHAPES, points=POINTS,
                                dtype=torch.float32, seed=4, borders=False))
    for run_inputs in runs:
        expected = module(*run_inputs)
        for runtime, run in RUNTIMES.items():
            assert_matches(run(model, run_inputs)[0], expected, f"{runtime}, batch {run_inputs[0].shape[0]}")


@pytest.mark.parametrize("method,bilinear", FORMS, ids=[f"{m}-{b}" for m, b in FORMS])
def test_exported_graph_handles_non_finite_and_far_locations_as_the_op(method, bilinear, tmp_path):
    """NaN, infinite, huge and just-outside locations: zero contribution (bilinear) or the border pixel
    (discrete), as the op's kernels give, in both runtimes; no index outside value (onnxruntime checks
    Gather indices and fails on one out of range)."""
    inputs = make_inputs(batch=2, queries=6, heads=2, channels=4, shapes=SHAPES, points=POINTS,
                         dtype=torch.float32, seed=5, borders=False)
    module = Attention(method)
    model = export_at(module, inputs, tmp_path, bilinear=bilinear)
    value, locations, weights = inputs
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1.0001, -0.0001, 3.0])
    generator = torch.Generator().manual_seed(6)
    chosen = torch.rand(locations.shape, generator=generator) < 0.4
    picks = special[torch.randint(0, len(special), locations.shape, generator=generator)]
    locations = torch.where(chosen, picks, locations)
    expected = module(value, locations, weights)  # the C++ kernel (or the reference without it)
    assert expected.isfinite().all()
    for runtime, run in RUNTIMES.items():
        assert_matches(run(model, [value, locations, weights])[0], expected, runtime)


def test_export_options_rejects_unknown_forms_and_leaves_eager_calls_alone():
    with pytest.raises(ValueError, match="bilinear must be one of"):
        with rtdetrv2_kernels.export_options(bilinear="nearest"):
            pass
    inputs = make_inputs(batch=1, queries=3, heads=2, channels=4, shapes=SHAPES, points=POINTS, dtype=torch.float32)
    eager = Attention("default")(*inputs)
    with rtdetrv2_kernels.export_options(bilinear="grid_sample"):
        assert torch.equal(Attention("default")(*inputs), eager)


@pytest.mark.parametrize("method,bilinear", FORMS, ids=[f"{m}-{b}" for m, b in FORMS])
def test_torchscript_exporter_at_opset_16(method, bilinear, tmp_path):
    """The older TorchScript-based exporter (dynamo=False), at GridSample's first opset."""
    inputs = make_inputs(batch=2, queries=5, heads=2, channels=4, shapes=SHAPES, points=POINTS,
                         dtype=torch.float32, seed=6, borders=False)
    module = Attention(method).eval()
    path = tmp_path / "attention.onnx"
    with warnings.catch_warnings(), rtdetrv2_kernels.export_options(bilinear=bilinear):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=16)
    model = onnx.load(str(path))
    assert [(entry.domain, entry.version) for entry in model.opset_import] == [("", 16)]
    check_operators(model, method, bilinear)
    for runtime, run in RUNTIMES.items():
        assert_matches(run(model, inputs)[0], module(*inputs), runtime)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_calls_outside_export_still_run_the_kernel(fused, monkeypatch):
    """The export check must not divert normal calls: the C++ kernel runs, before and after an export (which
    runs the reference instead)."""
    from rtdetrv2_kernels import backends

    if backends.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("the C++ kernels are not built")
    calls = []
    entry = "fused" if fused else "plain"
    kernel = getattr(backends.get("cpu"), entry)
    monkeypatch.setitem(backends._REGISTRY, "cpu", dataclasses.replace(
        backends.get("cpu"), **{entry: lambda *args: calls.append("cpu") or kernel(*args)}))
    monkeypatch.setattr(backends, "_RESOLVED", {})  # calls remembered with the unwrapped entry are stale now
    name = "ms_deform_attn_fused_reference" if fused else "ms_deform_attn_reference"
    reference = getattr(backends, name)
    monkeypatch.setattr(backends, name, lambda *args, **kwargs: calls.append("torch") or reference(*args, **kwargs))
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
    for runtime, run in RUNTIMES.items():
        assert_matches(run(model, other)[0], Attention("default")(*other), runtime)
