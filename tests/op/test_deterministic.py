"""torch.use_deterministic_algorithms(True): the CPU and CUDA backwards give the same bits on every run; the
Triton backward, which adds with atomics, raises (or warns with warn_only=True) as PyTorch's own ops do."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import (
    POINTS,
    SHAPES,
    assert_close,
    backends_for,
    cuda_kernel_params,
    make_inputs,
    needs_cpu_kernels,
    run_with_grads,
)

from rtdetrv2_kernels import ms_deform_attn, ms_deform_attn_fused, ms_deform_attn_reference

NAMES = ("output", "grad_value", "grad_locations", "grad_weights")
CUDA_KERNELS = cuda_kernel_params()  # on a GPU, and emulated on the CPU
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
    return run_with_grads(lambda v, r, o, a: ms_deform_attn_fused(v, SHAPES, r, o, a, POINTS, backend=backend), *inputs)


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


@pytest.mark.parametrize("backend,device", CUDA_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["default", "discrete"])
def test_cuda_deterministic_backward_repeats_bitwise_and_matches_reference(backend, device, dtype, method):
    # Many queries on small levels, so that many atomics land on every grad_value element.
    inputs = make_inputs(batch=2, queries=300, heads=4, channels=32, dtype=dtype, device=device)
    with deterministic():
        first = run_with_grads(plain(backend, method), *inputs)
        second = run_with_grads(plain(backend, method), *inputs)
    assert_bitwise_equal(first, second)
    expected = run_with_grads(
        lambda v, l, w: ms_deform_attn_reference(v, SHAPES, l, w, POINTS, method), *(t.double().cpu() for t in inputs)
    )
    for name, actual, wanted in zip(NAMES, first, expected):
        assert actual.dtype == dtype, name
        assert_close(actual, wanted, dtype, f"deterministic {name}")


@pytest.mark.parametrize("backend,device", CUDA_KERNELS)
def test_cuda_deterministic_fused_backward_repeats_bitwise_and_matches_the_default_mode(backend, device):
    inputs = fused_inputs(device, torch.float32, 32)
    with deterministic():
        first, second = run_fused(backend, inputs), run_fused(backend, inputs)
    assert_bitwise_equal(first, second)
    for index, (actual, atomic) in enumerate(zip(first, run_fused(backend, inputs))):
        assert_close(actual, atomic.double(), torch.float32, f"fused result {index}")


@pytest.mark.parametrize("backend,device", CUDA_KERNELS)
def test_cuda_deterministic_backward_propagates_non_finite_gradients(backend, device):
    value, locations, weights = (t.requires_grad_() for t in make_inputs(channels=32, dtype=torch.float32, device=device))
    output = ms_deform_attn(value, SHAPES, locations, weights, POINTS, backend=backend)
    grad_output = torch.ones_like(output)
    grad_output[0, 0, 0] = float("inf")
    with deterministic():
        (grad_value,) = torch.autograd.grad(output, value, grad_output)
    assert grad_value.isnan().all()  # documented: any non-finite contribution makes all of grad_value NaN


@pytest.mark.parametrize("backend,device", CUDA_KERNELS)
def test_cuda_backward_alerts_when_lane_groups_cannot_shuffle(backend, device):
    inputs = make_inputs(channels=3, dtype=torch.float32, device=device)  # 3 lanes of 1 channel: atomics only
    with deterministic(), pytest.raises(RuntimeError, match="not a power of two"):
        run_with_grads(plain(backend), *inputs)
    with deterministic(warn_only=True), pytest.warns(UserWarning, match="not a power of two"):
        run_with_grads(plain(backend), *inputs)


@pytest.mark.parametrize("backend,device", CUDA_KERNELS)
@pytest.mark.parametrize("logit", [float("nan"), float("inf"), -float("inf")])
def test_cuda_deterministic_fused_backward_keeps_non_finite_logits(backend, device, logit):
    # A diverging training step: one non-finite attention logit. The fixed-point scale's bound ignores the
    # logits (the softmaxed weights of finite logits sum to 1), so the NaN must reach grad_value through the
    # contributions themselves; +inf makes the head's softmax NaN too, -inf only zeroes one weight.
    inputs = fused_inputs(device, torch.float32, 32)
    inputs[3][1, 2, 3, 4] = logit
    default = run_fused(backend, inputs)
    with deterministic():
        fixed_point = run_fused(backend, inputs)
    if logit == -float("inf"):
        assert torch.isfinite(default[1]).all()
        for index, (actual, atomic) in enumerate(zip(fixed_point, default)):
            assert_close(actual, atomic.double(), torch.float32, f"fused result {index}")
    else:
        assert default[1].isnan().any()
        # Documented: a non-finite contribution makes all of grad_value NaN (a superset of the default's NaNs).
        assert fixed_point[1].isnan().all()
        for index in (0, 2, 3, 4):  # the output and the other gradients do not go through the fixed point
            assert torch.equal(fixed_point[index].isnan(), default[index].isnan()), f"fused result {index}"


@pytest.mark.parametrize("backend,device", CUDA_KERNELS)
def test_cuda_deterministic_backward_keeps_contributions_that_overflow_fp32(backend, device):
    # weight * grad_output overflows fp32 while the (fp64) fixed-point bound stays finite: the contributions
    # must be formed in fp64, so that grad_value is infinite where the default mode's is (two saturated
    # fixed-point contributions to one element would wrap around to a finite value).
    value, locations, weights = make_inputs(channels=32, dtype=torch.float32, device=device, borders=False)
    locations = locations.clamp(0.1, 0.9)
    locations[0, 1, 0, 0] = locations[0, 0, 0, 0]
    weights[0, 0, 0, 0] = weights[0, 1, 0, 0] = 3e38
    grad_output = torch.ones(2, locations.shape[1], 3 * 32) * 10
    default = run_with_grads(plain(backend), value, locations, weights, grad_output=grad_output)
    with deterministic():
        fixed_point = run_with_grads(plain(backend), value, locations, weights, grad_output=grad_output)
    assert default[1].isinf().any() and not default[1].isnan().any()
    assert torch.equal(fixed_point[1].isinf(), default[1].isinf()) and not fixed_point[1].isnan().any()
