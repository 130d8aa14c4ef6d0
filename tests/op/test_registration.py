"""The custom ops (opcheck, torch.compile) and backend selection."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo import compiled_autograd
from torch.utils._python_dispatch import TorchDispatchMode
from helpers import (FLAT_SHAPES, PLACED_STARTS, POINTS, SHAPES, assert_close, backends_for, cuda_kernel_params,
                     make_inputs, needs_cpu_kernels, place_levels)

import rtdetrv2_kernels
from rtdetrv2_kernels import ms_deform_attn

OPS = {  # backend -> (forward op, backward op)
    "cpu": ("ms_deform_attn_forward", "ms_deform_attn_backward"),
    "triton": ("triton_ms_deform_attn_forward", "triton_ms_deform_attn_backward"),
}


@pytest.mark.parametrize("backend", [b for b in OPS if b in backends_for("cpu")])
@pytest.mark.parametrize("method", ["default", "discrete"])
def test_opcheck_forward_and_backward(backend, method):
    value, locations, weights = make_inputs(batch=2, queries=3, heads=2, channels=5, borders=False)
    forward, backward = (getattr(torch.ops.rtdetrv2_kernels, name).default for name in OPS[backend])
    args = (value.requires_grad_(), FLAT_SHAPES, locations.requires_grad_(), weights.requires_grad_(), POINTS, method)
    torch.library.opcheck(forward, args)
    grad_output = torch.randn(2, 3, 10, dtype=torch.float64)
    torch.library.opcheck(backward, (grad_output, value.detach(), FLAT_SHAPES, locations.detach(),
                                     weights.detach(), POINTS, method))


@needs_cpu_kernels
@pytest.mark.parametrize("method", ["default", "discrete"])
def test_opcheck_tensor_levels(method):
    # The op compat's Deformable-DETR layout runs on: the level table as int64 tensors, which get no gradient.
    value, locations, weights = make_inputs(batch=2, queries=3, heads=2, channels=5, borders=False)
    ops = torch.ops.rtdetrv2_kernels
    table = (torch.tensor(SHAPES), torch.tensor(PLACED_STARTS))
    value = place_levels(value)
    torch.library.opcheck(ops.ms_deform_attn_forward_tensor_levels.default, (
        value.requires_grad_(), *table, locations.requires_grad_(), weights.requires_grad_(), POINTS, method))
    grad_output = torch.randn(2, 3, 10, dtype=torch.float64)
    torch.library.opcheck(ops.ms_deform_attn_backward_tensor_levels.default, (
        grad_output, value.detach(), *table, locations.detach(), weights.detach(), POINTS, method))


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("method", ["default", "discrete"])
def test_compile_fullgraph_without_graph_breaks(backend, method):
    value, locations, weights = make_inputs(dtype=torch.float32)

    def layer(v, l, w):
        return ms_deform_attn(v, SHAPES, l, w.softmax(-1), POINTS, method, backend=backend).relu().sum()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(value, locations, weights)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(layer, fullgraph=True)
    eager_inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    compiled_inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    expected = layer(*eager_inputs)
    actual = compiled(*compiled_inputs)
    torch.testing.assert_close(actual, expected)
    expected.backward()
    actual.backward()
    for a, e in zip(compiled_inputs, eager_inputs):
        torch.testing.assert_close(a.grad, e.grad)


FUSED_OPS = {"cpu": "ms_deform_attn_fused_forward", "triton": "triton_ms_deform_attn_fused_forward"}


class _Attention(torch.nn.Module):
    """The plain op, or the fused one reading the locations as offsets and the weights as logits."""

    def __init__(self, backend, fused):
        super().__init__()
        self.backend, self.fused = backend, fused

    def forward(self, value, locations, weights):
        if self.fused:
            boxes = torch.sigmoid(weights[:, :, :1, :4])  # (B, Q, 1, 4), from the inputs so it is not a constant
            return rtdetrv2_kernels.ms_deform_attn_fused(value, SHAPES, boxes, locations, weights, POINTS,
                                                         backend=self.backend)
        return ms_deform_attn(value, SHAPES, locations, weights.softmax(-1), POINTS, backend=self.backend)


@pytest.mark.parametrize("backend", [b for b in OPS if b in backends_for("cpu")])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_torch_export_keeps_the_kernel_with_a_dynamic_batch(backend, fused):
    """torch.export.export (unlike torch.onnx.export) keeps the custom op in the graph; the program runs on
    another batch size."""
    module = _Attention(backend, fused)
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, make_inputs(dtype=torch.float32, borders=False),
                                  dynamic_shapes=({0: batch},) * 3)
    forward = FUSED_OPS[backend] if fused else OPS[backend][0]
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert f"rtdetrv2_kernels.{forward}.default" in targets, targets
    other = make_inputs(batch=3, dtype=torch.float32, borders=False, seed=2)
    torch.testing.assert_close(program.module()(*other), module(*other))


def test_available_backends():
    available = rtdetrv2_kernels.available_backends()
    assert "torch" in available
    assert set(available) <= set(rtdetrv2_kernels.BACKENDS)


def test_unavailable_backend_says_why():
    value, locations, weights = make_inputs()
    missing = [b for b in rtdetrv2_kernels.BACKENDS if b not in backends_for("cpu")]
    assert "cuda" in missing  # CPU tensors never run on the CUDA backend
    for backend in missing:
        with pytest.raises(RuntimeError, match=f"backend='{backend}' is not available: "):
            ms_deform_attn(value, SHAPES, locations, weights, POINTS, backend=backend)


def _chosen_backend(env_value):
    """The backend a fresh process picks for CPU tensors, with RTDETRV2_KERNELS_BACKEND set to env_value."""
    code = (
        "import rtdetrv2_kernels.backends as b; "
        "import torch; print(b.resolve_backend(None, 'cpu', torch.float32, 3))"
    )
    env = dict(os.environ)
    env.pop(rtdetrv2_kernels.ENV_VAR, None)
    if env_value is not None:
        env[rtdetrv2_kernels.ENV_VAR] = env_value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_default_backend_and_environment_override():
    default = _chosen_backend(None)
    assert default.returncode == 0, default.stderr
    expected_default = "cpu" if "cpu" in backends_for("cpu") else "torch"
    assert default.stdout.strip() == expected_default
    forced = _chosen_backend("torch")
    assert forced.stdout.strip() == "torch", forced.stderr
    bad = _chosen_backend("fastest")
    assert bad.returncode != 0 and "RTDETRV2_KERNELS_BACKEND='fastest'" in bad.stderr
    unavailable = _chosen_backend("cuda")
    assert unavailable.returncode != 0 and "RTDETRV2_KERNELS_BACKEND='cuda' is not available" in unavailable.stderr


def test_explicit_backend_argument_beats_environment(monkeypatch):
    value, locations, weights = make_inputs()
    monkeypatch.setenv(rtdetrv2_kernels.ENV_VAR, "cuda")  # would fail for CPU tensors
    output = ms_deform_attn(value, SHAPES, locations, weights, POINTS, backend="torch")
    assert output.shape == (2, 5, 21)


def test_the_environment_variable_is_read_at_every_call(monkeypatch):
    value, locations, weights = make_inputs()
    monkeypatch.delenv(rtdetrv2_kernels.ENV_VAR, raising=False)
    ms_deform_attn(value, SHAPES, locations, weights, POINTS)
    monkeypatch.setenv(rtdetrv2_kernels.ENV_VAR, "cuda")  # the same call, remembered as checked, now refused
    with pytest.raises(RuntimeError, match="RTDETRV2_KERNELS_BACKEND='cuda' is not available"):
        ms_deform_attn(value, SHAPES, locations, weights, POINTS)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_a_call_needing_no_gradient_records_none(backend):
    """Calls that need no gradient skip the op's autograd kernel; the others still record the graph."""
    value, locations, weights = make_inputs()
    assert ms_deform_attn(value, SHAPES, locations, weights, POINTS, backend=backend).grad_fn is None
    value.requires_grad_(True)
    with torch.no_grad():
        assert ms_deform_attn(value, SHAPES, locations, weights, POINTS, backend=backend).grad_fn is None
    output = ms_deform_attn(value, SHAPES, locations, weights, POINTS, backend=backend)
    assert output.grad_fn is not None
    output.sum().backward()
    assert value.grad is not None and value.grad.abs().sum() > 0


@needs_cpu_kernels
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_the_cpp_gradient_node_keeps_autograds_rules(fused):
    """The C++ ops' autograd kernel (csrc/ms_deform_attn_autograd.h) records a node that behaves as autograd's
    own: its inputs saved through saved-tensor hooks and checked for in-place changes, freed after a backward,
    run by compiled autograd, and a clear error for forward-mode AD, which it lacks."""
    value, locations, weights = (t.requires_grad_() for t in make_inputs(batch=1, queries=3, heads=2, channels=4))
    reference = torch.rand(1, 3, 1, 4, dtype=value.dtype, requires_grad=True)
    if fused:
        def call(value=value):
            return rtdetrv2_kernels.ms_deform_attn_fused(value, SHAPES, reference, locations, weights, POINTS)
    else:
        def call(value=value):
            return ms_deform_attn(value, SHAPES, locations, weights, POINTS)
    assert "rtdetrv2_kernels" in call().grad_fn.name()

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        output = call()
    assert len(packed) == (4 if fused else 3) and any(t is value for t in packed)
    output.sum().backward(retain_graph=True)
    first = value.grad.clone()
    output.sum().backward()  # the graph was retained: the same gradient again
    torch.testing.assert_close(value.grad, 2 * first, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        output.sum().backward()

    value.grad = None
    output = call()
    with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
        output.sum().backward()
    torch.testing.assert_close(value.grad, first, rtol=1e-12, atol=1e-12)

    output = call()
    with torch.no_grad():
        locations.mul_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        output.sum().backward()

    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(value.detach(), torch.ones_like(value))
        with pytest.raises(RuntimeError, match="has no forward-mode derivative"):
            call(dual)


class _OpsSeen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@needs_cpu_kernels
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_the_eager_fast_path_still_shows_the_op_to_modes_and_the_profiler(fused, requires_grad):
    """Repeated eager calls skip the checks (the call cache), not the dispatcher: a dispatch mode and the
    profiler still see the op, and give the same result."""
    value, locations, weights = make_inputs(batch=1, queries=3, heads=2, channels=4)
    value.requires_grad_(requires_grad)
    if fused:
        reference = torch.rand(1, 3, 1, 4, dtype=value.dtype)

        def call():
            return rtdetrv2_kernels.ms_deform_attn_fused(value, SHAPES, reference, locations, weights, POINTS)
    else:
        def call():
            return ms_deform_attn(value, SHAPES, locations, weights, POINTS)
    name = "rtdetrv2_kernels::ms_deform_attn_fused_forward" if fused else "rtdetrv2_kernels::ms_deform_attn_forward"
    expected = call()
    call()  # the second call with this signature takes the remembered path
    with _OpsSeen() as seen:
        assert_close(call(), expected, torch.float64, "under a dispatch mode")
    assert name in seen.names
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        assert_close(call(), expected, torch.float64, "under the profiler")
    assert name in {event.name for event in profile.events()}


# 17 levels: one more than the CUDA kernels' level table holds (csrc/cuda/: kMaxLevels).
MANY_SHAPES = [(1 + level % 3, 2 + level % 4) for level in range(17)]
MANY_POINTS = [1 + level % 2 for level in range(17)]


def _run_many_levels(device, backend=None):
    value, locations, weights = make_inputs(queries=3, heads=2, channels=4, shapes=MANY_SHAPES, points=MANY_POINTS,
                                            device=device, borders=False)
    output = ms_deform_attn(value, MANY_SHAPES, locations, weights, MANY_POINTS, backend=backend)
    expected = rtdetrv2_kernels.ms_deform_attn_reference(value.cpu(), MANY_SHAPES, locations.cpu(), weights.cpu(),
                                                          MANY_POINTS)
    assert_close(output, expected, torch.float64, "17 levels")


@pytest.mark.parametrize("backend, device", cuda_kernel_params())
def test_automatic_selection_passes_over_a_backend_whose_kernels_cannot_take_the_input(backend, device, monkeypatch):
    from rtdetrv2_kernels import backends

    limited = backends.get(backend)
    assert limited.max_levels == 16
    if device == "cpu":
        # An emulated build: tried first for CPU tensors, as the "cuda" backend is for CUDA tensors.
        registry = {backend: dataclasses.replace(limited, device_types=("cpu",)),
                    **{name: b for name, b in backends._REGISTRY.items() if name != backend}}
        monkeypatch.setattr(backends, "_REGISTRY", registry)
    monkeypatch.setattr(backends, "_RESOLVED", {})
    monkeypatch.delenv(rtdetrv2_kernels.ENV_VAR, raising=False)
    assert backends.resolve_backend(None, device, torch.float64, 16) == backend
    assert backends.resolve_backend(None, device, torch.float64, 17) != backend
    _run_many_levels(device)
    with pytest.raises(RuntimeError, match=f"backend='{backend}' is not available: its kernels take up to 16 levels, "
                                           "got 17"):
        _run_many_levels(device, backend)


@needs_cpu_kernels
def test_seventeen_levels_run_on_the_cpu_kernels():
    from rtdetrv2_kernels import backends

    assert backends.resolve_backend(None, "cpu", torch.float64, 17) == "cpu"
    _run_many_levels("cpu")


def test_backend_records_state_their_limits():
    from rtdetrv2_kernels import backends

    call = backends.Call("cpu", torch.float32, 3)
    assert backends.get("torch").not_supported_reasons(call) == []
    assert backends.get("torch").not_supported_reasons(call._replace(device_type="meta")) == []
    assert backends.get("cuda").not_supported_reasons(call) == ["it runs on CUDA tensors, got cpu tensors"]
    assert not backends.get("triton").deterministic and backends.get("cpu").deterministic
    loaded = dataclasses.replace(backends.get("cuda"), unavailable=lambda device_type: None)  # as on a GPU
    assert loaded.not_supported_reasons(call._replace(device_type="cuda")) == []
    assert loaded.not_supported_reasons(call._replace(device_type="cuda", num_levels=17)) == [
        "its kernels take up to 16 levels, got 17"]
    assert loaded.not_supported_reasons(call._replace(device_type="cuda", dtype=torch.int32)) == [
        "its kernels take float16, bfloat16, float32, float64, got int32"]
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.get("fastest")
