"""The tests that are the same for every form of the op (op_cases.py), on every backend that runs the form:
first derivatives against finite differences, differentiable gradients (second derivatives), and CUDA-graph
replay of the forward and backward."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import GPU_KERNELS, assert_close, backend_params, capture_cuda_graph, needs_gpu_kernels
from op_cases import case_params

CASES = case_params(p.values for p in backend_params())
# Without a GPU, one placeholder that needs_gpu_kernels skips with its reason.
GPU_CASES = case_params((b, "cuda") for b in GPU_KERNELS) or [pytest.param(None, None, None, None, id="none")]


@pytest.mark.parametrize("case,backend,device,method", CASES)
def test_gradcheck(case, backend, device, method):
    # Finite differences step across a bilinear kink or a pixel edge of the discrete method (whose location
    # gradient is zero) only with negligible probability at random locations.
    inputs = [t.requires_grad_() for t in case.inputs(case.tiny, device=device)]
    assert torch.autograd.gradcheck(case.op(case.tiny, backend, method, device), inputs, eps=1e-6, atol=1e-7)


@functools.cache
def grid_sample_twice_differentiable() -> bool:
    image = torch.rand(1, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    grid = torch.rand(1, 1, 1, 2, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(torch.nn.functional.grid_sample(image, grid, align_corners=False).sum(), grid,
                                      create_graph=True)
    try:
        torch.autograd.grad(gradient.sum(), image)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("case,backend,device,method", CASES)
def test_second_derivatives(case, backend, device, method):
    # create_graph=True (gradient penalties, double backward): the gradients must be differentiable again,
    # not silently None. The kernels compute first derivatives only; the reference (its gather form)
    # supplies these. The "torch" backend is the grid_sample reference itself: it needs grid_sample's own
    # double backward, which older torch releases lack.
    if backend == "torch" and method == "default" and not grid_sample_twice_differentiable():
        pytest.skip(f"torch {torch.__version__}: grid_sample has no double backward")
    inputs = [t.requires_grad_() for t in case.inputs(case.tiny, device=device)]
    assert torch.autograd.gradgradcheck(case.op(case.tiny, backend, method, device), inputs, eps=1e-6, atol=1e-6)


@needs_gpu_kernels
@pytest.mark.parametrize("case,backend,device,method", GPU_CASES)
def test_forward_and_backward_replay_in_a_cuda_graph(case, backend, device, method):
    layout = case.standard
    inputs = [t.requires_grad_() for t in case.inputs(layout, device=device, dtype=torch.float32)]
    op = case.op(layout, backend, method, device)
    grad_output = torch.randn(layout.output_shape, device=device)

    def step():
        output = op(*inputs)
        return (output, *torch.autograd.grad(output, inputs, grad_output))

    graph, captured = capture_cuda_graph(step)
    with torch.no_grad():
        for target, source in zip(inputs, case.inputs(layout, device=device, dtype=torch.float32, seed=7)):
            target.copy_(source)
    graph.replay()
    names = ("output", *(f"grad of {name}" for name in case.input_names))
    for name, replayed, eager in zip(names, captured, step()):  # atomics may sum in another order
        assert_close(replayed, eager, torch.float32, f"{name} replayed")
