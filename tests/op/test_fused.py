"""ms_deform_attn_fused: the RT-DETRv2 attention core (softmax over each head's points and the sampling
locations from reference boxes or points, then the sampling), on every backend."""

from __future__ import annotations

import fractions

import numpy as np
import pytest
import torch
from helpers import (FAMILY_HEAD_SIZES, FLAT_SHAPES, FUSED_POINTS, SHAPES, assert_close, backend_params, backends_for,
                     make_fused_inputs, run_with_grads)

from rtdetrv2_kernels import ms_deform_attn, ms_deform_attn_fused, ms_deform_attn_fused_reference

POINTS = FUSED_POINTS


def naive_locations_and_weights(shapes, ref, offsets, logits, points, offset_scale):
    """The formulas of docs/semantics.md written point by point."""
    locations = torch.empty_like(offsets)
    p = 0
    for level, ((height, width), count) in enumerate(zip(shapes, points)):
        r = ref[:, :, level if ref.shape[2] > 1 else 0]  # (B, Q, k)
        for _ in range(count):
            for axis, size in ((0, width), (1, height)):
                o = offsets[:, :, :, p, axis]
                if ref.shape[-1] == 4:
                    locations[:, :, :, p, axis] = r[:, :, None, axis] + o / count * r[:, :, None, 2 + axis] * offset_scale
                else:
                    locations[:, :, :, p, axis] = r[:, :, None, axis] + o / size
            p += 1
    weights = logits.exp() / logits.exp().sum(-1, keepdim=True)
    return locations, weights


@pytest.mark.parametrize("reference", ["boxes", "points"])
@pytest.mark.parametrize("per_level", [False, True])
@pytest.mark.parametrize("method", ["default", "discrete"])
def test_reference_follows_the_formulas(reference, per_level, method):
    value, ref, offsets, logits = make_fused_inputs(reference=reference, per_level=per_level)
    locations, weights = naive_locations_and_weights(SHAPES, ref, offsets, logits, POINTS, 0.7)
    expected = ms_deform_attn(value, SHAPES, locations, weights, POINTS, method, backend="torch")
    actual = ms_deform_attn_fused_reference(value, SHAPES, ref, offsets, logits, POINTS, 0.7, method)
    assert_close(actual, expected, torch.float64, "fused reference")


def check_against_reference(backend, device, method, dtype, **options):
    """The fused op's output and gradients on `backend` in `dtype` against the fp64 reference on the same
    inputs (make_fused_inputs(**options)); returns the output and the gradients."""
    inputs = make_fused_inputs(device=device, **options)
    expected = run_with_grads(
        lambda v, r, o, a: ms_deform_attn_fused_reference(v, SHAPES, r, o, a, POINTS, 0.5, method), *inputs)
    actual = run_with_grads(
        lambda v, r, o, a: ms_deform_attn_fused(v, SHAPES, r, o, a, POINTS, 0.5, method, backend=backend),
        *(t.to(dtype) for t in inputs))
    for name, a, e in zip(("output", "value", "reference_points", "sampling_offsets", "attention_logits"),
                          actual, expected):
        assert_close(a, e, dtype, f"{backend} C={inputs[0].shape[-1]} {name}")
    return actual


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reference,per_level", [("boxes", False), ("boxes", True), ("points", True)])
@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backends_match_the_reference_with_gradients(backend, device, reference, per_level, method, dtype):
    actual = check_against_reference(backend, device, method, dtype, reference=reference, per_level=per_level)
    if method == "discrete":  # the nearest pixel does not move with the offsets
        assert actual[2].abs().max() == 0 and actual[3].abs().max() == 0


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("channels", FAMILY_HEAD_SIZES)
def test_family_head_sizes(backend, device, method, channels):
    check_against_reference(backend, device, method, torch.float32, batch=1, queries=3, heads=2, channels=channels)


def test_matches_transformers_rtdetrv2_cross_attention():
    """Hugging Face's RTDetrV2MultiscaleDeformableAttention (written elsewhere) against its own linear layers
    feeding ms_deform_attn_fused, for both sampling methods."""
    configuration = pytest.importorskip("transformers.models.rt_detr_v2.configuration_rt_detr_v2")
    modeling = pytest.importorskip("transformers.models.rt_detr_v2.modeling_rt_detr_v2")
    shapes = [(6, 10), (5, 3), (2, 4)]
    for method in ("default", "discrete"):
        config = configuration.RTDetrV2Config(d_model=32, decoder_attention_heads=4, decoder_n_levels=3,
                                              decoder_n_points=3, decoder_method=method, decoder_offset_scale=0.5)
        torch.manual_seed(0)
        attention = modeling.RTDetrV2MultiscaleDeformableAttention(config).eval()
        with torch.no_grad():
            for parameter in attention.parameters():
                parameter.normal_(0, 0.5)
        hidden = torch.randn(2, 7, 32)
        memory = torch.randn(2, sum(h * w for h, w in shapes), 32)
        boxes = torch.cat([torch.rand(2, 7, 1, 2), torch.rand(2, 7, 1, 2) * 0.5 + 0.1], -1)
        with torch.no_grad():
            expected, _ = attention(hidden, encoder_hidden_states=memory, reference_points=boxes,
                                    spatial_shapes=torch.tensor(shapes), spatial_shapes_list=shapes)
            value = attention.value_proj(memory).view(2, -1, 4, 8)
            offsets = attention.sampling_offsets(hidden).view(2, 7, 4, 9, 2)
            logits = attention.attention_weights(hidden).view(2, 7, 4, 9)
            for backend in ("cpu", "torch"):
                out = ms_deform_attn_fused(value, shapes, boxes, offsets, logits, [3, 3, 3], 0.5, method,
                                           backend=backend)
                actual = attention.output_proj(out)
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{method}/{backend}: {m}")


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_compiles_without_graph_breaks(backend):
    value, ref, offsets, logits = make_fused_inputs(dtype=torch.float32)

    def layer(v, r, o, a):
        return ms_deform_attn_fused(v, SHAPES, r, o, a, POINTS, 0.5, backend=backend) * 2

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(value, ref, offsets, logits), layer(value, ref, offsets, logits))


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda i: {**i, "reference_points": i["reference_points"][..., :3]}, None, "reference_points must have shape"),
        (lambda i: {**i, "reference_points": i["reference_points"].expand(-1, -1, 2, -1)}, None, "1 or L"),
        (lambda i: {**i, "sampling_offsets": i["sampling_offsets"][..., :1, :]}, None,
         "sampling_offsets must have shape"),
        (lambda i: {**i, "attention_logits": i["attention_logits"].float()}, None, "attention_logits has dtype"),
        (lambda i: {**i, "reference_points": i["reference_points"].float()}, None, "reference_points has dtype"),
        (lambda i: {**i, "offset_scale": "0.5"}, TypeError, "offset_scale must be a real number, got str"),
        (lambda i: {**i, "offset_scale": True}, TypeError, "offset_scale must be a real number, got bool"),
        (lambda i: {**i, "offset_scale": float("nan")}, ValueError, "offset_scale must be finite, got nan"),
        (lambda i: {**i, "offset_scale": -float("inf")}, ValueError, "offset_scale must be finite, got -inf"),
        (lambda i: {**i, "offset_scale": np.float32("inf")}, ValueError, "offset_scale must be finite, got inf"),
    ],
)
@pytest.mark.parametrize("after_a_good_call", [False, True], ids=["first", "after-good"])
def test_bad_input_names_the_argument(change, error, message, after_a_good_call):
    value, ref, offsets, logits = make_fused_inputs()
    arguments = dict(value=value, spatial_shapes=SHAPES, reference_points=ref, sampling_offsets=offsets,
                     attention_logits=logits, num_points=POINTS, offset_scale=0.5)
    if after_a_good_call:  # a remembered call of the same tensors must not excuse this one
        ms_deform_attn_fused(**arguments)
    if error is None:
        error = (ValueError, TypeError)
    with pytest.raises(error, match=message):
        ms_deform_attn_fused(**change(arguments))


@pytest.mark.parametrize("scale", [np.float32(0.5), np.float64(0.5), np.int64(1), 1, fractions.Fraction(1, 2)],
                         ids=lambda s: type(s).__name__)
def test_offset_scale_takes_any_real_scalar(scale):
    value, ref, offsets, logits = make_fused_inputs()
    expected = ms_deform_attn_fused(value, SHAPES, ref, offsets, logits, POINTS, float(scale))
    torch.testing.assert_close(ms_deform_attn_fused(value, SHAPES, ref, offsets, logits, POINTS, scale), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reference", ["boxes", "points"])
def test_discrete_gradients_of_offsets_and_references_are_zero_even_when_not_finite(backend, device, reference):
    """docs/semantics.md: with method="discrete" the offsets and references get exact zeros, also where the
    chain rule through the locations would multiply zero by an infinite or NaN offset or box size."""
    value, ref, offsets, logits = make_fused_inputs(reference=reference, device=device)
    ref, offsets = ref.clone(), offsets.clone()
    offsets[0, 0, 0, 0, 0] = float("nan")
    offsets[0, 1, 1, 2, 1] = float("inf")
    ref[1, 2, 0, -1] = float("inf")  # a box height, or a point's y
    ref[1, 3, 0, 0] = float("nan")
    _, grad_value, grad_ref, grad_offsets, grad_logits = run_with_grads(
        lambda v, r, o, a: ms_deform_attn_fused(v, SHAPES, r, o, a, POINTS, 0.5, "discrete", backend=backend),
        value, ref, offsets, logits)
    assert torch.equal(grad_ref, torch.zeros_like(grad_ref)), backend
    assert torch.equal(grad_offsets, torch.zeros_like(grad_offsets)), backend
    assert torch.isfinite(grad_logits[0, 2:]).all() and torch.isfinite(grad_value).any()


FUSED_OPS = {"cpu": "ms_deform_attn_fused", "triton": "triton_ms_deform_attn_fused"}


@pytest.mark.parametrize("backend", [b for b in FUSED_OPS if b in backends_for("cpu")])
@pytest.mark.parametrize("reference,method", [("boxes", "default"), ("points", "discrete")])
def test_opcheck_fused_ops(backend, reference, method):
    dtype = torch.float32 if backend == "triton" else torch.float64
    value, ref, offsets, logits = make_fused_inputs(batch=2, queries=3, heads=2, channels=5, reference=reference,
                                               per_level=reference == "points", dtype=dtype)
    ops = torch.ops.rtdetrv2_kernels
    forward = getattr(ops, FUSED_OPS[backend] + "_forward").default
    backward = getattr(ops, FUSED_OPS[backend] + "_backward").default
    torch.library.opcheck(forward, (value.requires_grad_(), FLAT_SHAPES, ref.requires_grad_(), offsets.requires_grad_(),
                                    logits.requires_grad_(), POINTS, 0.5, method))
    grad_output = torch.randn(2, 3, 10, dtype=dtype)
    torch.library.opcheck(backward, (grad_output, value.detach(), FLAT_SHAPES, ref.detach(), offsets.detach(),
                                     logits.detach(), POINTS, 0.5, method))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_inputs_compute_in_fp32(dtype):
    """The CPU kernel keeps locations and weights in fp32 (the composed path rounds them to the dtype), so it
    is checked against the fp64 reference on the same half-precision inputs."""
    value, ref, offsets, logits = (t.to(dtype) for t in make_fused_inputs())
    actual = ms_deform_attn_fused(value, SHAPES, ref, offsets, logits, POINTS, 0.5, backend="cpu")
    assert actual.dtype == dtype
    expected = ms_deform_attn_fused_reference(value.double(), SHAPES, ref.double(), offsets.double(),
                                              logits.double(), POINTS, 0.5)
    assert_close(actual, expected, dtype, "half output")


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_and_nonfinite(backend, device):
    value, ref, offsets, logits = make_fused_inputs(device=device, dtype=torch.float32)
    empty = ms_deform_attn_fused(value[:0], SHAPES, ref[:0], offsets[:0], logits[:0], POINTS, backend=backend)
    assert empty.shape == (0, 5, 21)
    offsets = offsets.clone()
    offsets[0, 0, 0, 0] = float("nan")
    offsets[0, 1, 0, 1] = float("inf")
    offsets[1, 2, 1, 2] = 1e30
    out = ms_deform_attn_fused(value, SHAPES, ref, offsets, logits, POINTS, backend=backend)
    expected = ms_deform_attn_fused_reference(value.double(), SHAPES, ref.double(), offsets.double(),
                                              logits.double(), POINTS, 0.5)
    assert_close(out, expected, torch.float32, f"{backend} with non-finite offsets")
