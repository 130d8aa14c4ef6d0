"""The vectorized PyTorch reference against the naive loop and against Hugging Face transformers."""

from __future__ import annotations

import pytest
import torch
from helpers import POINTS, SHAPES, assert_close, make_inputs, run_with_grads
from naive import naive_ms_deform_attn

from rtdetrv2_kernels import ms_deform_attn_reference

METHODS = ["default", "discrete"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_naive_loop(method, seed):
    inputs = make_inputs(batch=1, queries=3, heads=2, channels=3, seed=seed)
    expected = run_with_grads(lambda v, l, w: naive_ms_deform_attn(v, SHAPES, l, w, POINTS, method), *inputs)
    actual = run_with_grads(lambda v, l, w: ms_deform_attn_reference(v, SHAPES, l, w, POINTS, method), *inputs)
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
        assert_close(a, e, torch.float64, name)


@pytest.mark.parametrize("method", METHODS)
def test_reference_handles_nonfinite_and_huge_locations(method):
    value, locations, weights = make_inputs(batch=1, queries=4, heads=2, channels=3, borders=False)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e9], dtype=torch.float64)
    locations[0, :, :, :, 0].view(-1)[: specials.numel()] = specials
    locations[0, :, :, :, 1].view(-1)[-specials.numel() :] = specials.flip(0)
    expected = run_with_grads(lambda v, l, w: naive_ms_deform_attn(v, SHAPES, l, w, POINTS, method),
                              value, locations, weights)
    actual = run_with_grads(lambda v, l, w: ms_deform_attn_reference(v, SHAPES, l, w, POINTS, method),
                            value, locations, weights)
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, torch.float64, name)


def _transformers_msda():
    module = pytest.importorskip("transformers.models.rt_detr_v2.modeling_rt_detr_v2")
    return module.multi_scale_deformable_attention_v2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shapes,points", [(SHAPES, POINTS), ([(6, 6), (3, 3), (2, 2)], [4, 4, 4]), ([(5, 9)], [3])]
)
def test_reference_matches_transformers(dtype, method, shapes, points):
    hf = _transformers_msda()
    inputs = make_inputs(batch=2, queries=6, heads=2, channels=4, shapes=shapes, points=points, dtype=dtype)
    expected = run_with_grads(lambda v, l, w: hf(v, shapes, l, w, points, method), *inputs)
    actual = run_with_grads(lambda v, l, w: ms_deform_attn_reference(v, shapes, l, w, points, method), *inputs)
    names = ("output", "grad_value", "grad_locations", "grad_weights")
    for name, a, e in zip(names, actual, expected):
        if e is None:  # transformers leaves the discrete locations out of the graph; the contract says zeros
            assert name == "grad_locations" and method == "discrete"
            assert torch.equal(a, torch.zeros_like(a))
            continue
        assert_close(a, e, dtype, name)
