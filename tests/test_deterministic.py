"""torch.use_deterministic_algorithms(True): the CPU and CUDA backwards give the same bits on every run; the
Triton backward, which adds with atomics, raises (or warns with warn_only=True) as PyTorch's own ops do."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import POINTS, SHAPES, assert_close, backends_for, make_inputs, needs_cpu_kernels, run_with_grads

from rtdetrv2_kernels import ms_deform_attn, ms_deform_attn_fused, ms_deform_attn_reference

NAMES = ("output", "grad_value", "grad_locations", "grad_weights")
HAS_CUDA_KERNELS = torch.cuda.is_available() and "cuda" in backends_for("cuda")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs it on CPU tensors


@contextlib.contextmanager
def deterministic(warn_only=False):
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def plain(backend, method="default"):
    return lambda v, l, w: ms_deform_attn(v, SHAPES, l, w, POINTS, method, backend=backend)


def fused_inputs(device, dtype, channels, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch, queries, heads = 2, 9, 4
    rows = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, rows, heads, channels, generator=generator)
    reference = torch.rand(batch, queries, 1, 4, generator=generator) * 0.8 + 0.1
    offsets = torch.randn(batch, queries, heads, sum(POINTS), 2, generator=generator)
    logits = torch.randn(batch, queries, heads, sum(POINTS), generator=generator)
    return [t.to(device=device, dtype=dtype) for t in (value, reference, offsets, logits)]


def run_fused(backend, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    value, reference, offsets, logits = leaves
    output = ms_deform_attn_fused(value, SHAPES, reference, offsets, logits, POINTS, backend=backend)
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1)).to(output)
    return (output, *torch.autograd.grad(output, leaves, grad_output))


def assert_bitwise_equal(first, second):
    for index, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {index} differs between two identical runs"


@needs_cpu_kernels
def test_cpu_backward_runs_and_repeats_under_deterministic_mode():
    inputs = make_inputs(channels=32, dtype=torch.float32)
    with deterministic():
        first = run_with_grads(plain("cpu"), *inputs)
        second = run_with_grads(plain("cpu"), *inputs)
        assert_bitwise_equal(first, second)
        assert_bitwise_equal(run_fused("cpu", fused_inputs("cpu", torch.float32, 32)),
                             run_fused("cpu", fused_inputs("cpu", torch.float32, 32)))


@pytest.mark.skipif("triton" not in backends_for(TRITON_DEVICE), reason="Triton is not available")
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_triton_backward_alerts_under_deterministic_mode(fused):
    inputs = make_inputs(channels=8, dtype=torch.float32, device=TRITON_DEVICE)
    extra = fused_inputs(TRITON_DEVICE, torch.float32, 8)

    def backward():
        return run_fused("triton", extra) if fused else run_with_grads(plain("triton"), *inputs)

    with deterministic(), pytest.raises(RuntimeError, match="not deterministic.*'cuda' backend"):
        backward()
    with torch.no_grad(), deterministic():  # the forward has no atomics
        ms_deform_attn(*inputs[:1], SHAPES, *inputs[1:], POINTS, backend="triton")
    with deterministic(warn_only=True), pytest.warns(UserWarning, match="not deterministic"):
        backward()


needs_cuda_kernels = pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the CUDA kernels")


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["default", "discrete"])
def test_cuda_deterministic_backward_repeats_bitwise_and_matches_reference(dtype, method):
    # Many queries on small levels, so that many atomics land on every grad_value element.
    inputs = make_inputs(batch=2, queries=300, heads=4, channels=32, dtype=dtype, device="cuda")
    with deterministic():
        first = run_with_grads(plain("cuda", method), *inputs)
        second = run_with_grads(plain("cuda", method), *inputs)
    assert_bitwise_equal(first, second)
    expected = run_with_grads(
        lambda v, l, w: ms_deform_attn_reference(v, SHAPES, l, w, POINTS, method), *(t.double().cpu() for t in inputs)
    )
    for name, actual, wanted in zip(NAMES, first, expected):
        assert actual.dtype == dtype, name
        assert_close(actual, wanted, dtype, f"deterministic {name}")


@needs_cuda_kernels
def test_cuda_deterministic_fused_backward_repeats_bitwise_and_matches_the_default_mode():
    inputs = fused_inputs("cuda", torch.float32, 32)
    with deterministic():
        first, second = run_fused("cuda", inputs), run_fused("cuda", inputs)
    assert_bitwise_equal(first, second)
    for index, (actual, atomic) in enumerate(zip(first, run_fused("cuda", inputs))):
        assert_close(actual, atomic.double(), torch.float32, f"fused result {index}")


@needs_cuda_kernels
def test_cuda_deterministic_backward_propagates_non_finite_gradients():
    value, locations, weights = (t.requires_grad_() for t in make_inputs(channels=32, dtype=torch.float32, device="cuda"))
    output = ms_deform_attn(value, SHAPES, locations, weights, POINTS, backend="cuda")
    grad_output = torch.ones_like(output)
    grad_output[0, 0, 0] = float("inf")
    with deterministic():
        (grad_value,) = torch.autograd.grad(output, value, grad_output)
    assert grad_value.isnan().all()  # documented: any non-finite contribution makes all of grad_value NaN


@needs_cuda_kernels
def test_cuda_backward_alerts_when_lane_groups_cannot_shuffle():
    inputs = make_inputs(channels=3, dtype=torch.float32, device="cuda")  # 3 lanes of 1 channel: atomics only
    with deterministic(), pytest.raises(RuntimeError, match="not a power of two"):
        run_with_grads(plain("cuda"), *inputs)
    with deterministic(warn_only=True), pytest.warns(UserWarning, match="not a power of two"):
        run_with_grads(plain("cuda"), *inputs)
