"""Bad input gets a clear TypeError/ValueError naming the argument and what was expected."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import FLAT_SHAPES, POINTS, SHAPES, backend_params, backends_for, make_inputs, needs_cpu_kernels

from rtdetrv2_kernels import ms_deform_attn


@pytest.fixture
def inputs():
    return make_inputs(batch=2, queries=3, heads=2, channels=4)


def call(inputs, **overrides):
    value, locations, weights = inputs
    args = dict(value=value, spatial_shapes=SHAPES, sampling_locations=locations, attention_weights=weights,
                num_points=POINTS)
    args.update(overrides)
    return ms_deform_attn(**args)


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (lambda v, l, w: dict(value=v[0]), ValueError, r"value must have shape \(B, S, H, C\), got \(63, 2, 4\)"),
        (lambda v, l, w: dict(value=v.tolist()), TypeError, r"value must be a torch.Tensor"),
        (lambda v, l, w: dict(sampling_locations=l[..., 0]), ValueError, r"sampling_locations must have shape"),
        (lambda v, l, w: dict(sampling_locations=torch.cat([l, l], -1)), ValueError,
         r"sampling_locations must have shape \(B, Q, H, P, 2\) = \(2, 3, 2, 11, 2\)"),
        (lambda v, l, w: dict(attention_weights=w[..., None]), ValueError, r"attention_weights must have shape"),
        (lambda v, l, w: dict(sampling_locations=l[:1]), ValueError, r"sampling_locations must have shape"),
        (lambda v, l, w: dict(attention_weights=w[:, :2]), ValueError, r"attention_weights must have shape \(B, Q, H, P\) = \(2, 3, 2, 11\)"),
        (lambda v, l, w: dict(value=v[:, :, :1]), ValueError, r"sampling_locations must have shape"),
        (lambda v, l, w: dict(sampling_locations=l[:, :, :, :10], attention_weights=w[..., :10]), ValueError,
         r"P = 11"),
        (lambda v, l, w: dict(value=v[:, :-1]), ValueError, r"value has S=62 rows but spatial_shapes .* sum to 63"),
        (lambda v, l, w: dict(num_points=[3, 6]), ValueError, r"num_points has 2 entries but spatial_shapes has 3 levels"),
        (lambda v, l, w: dict(num_points=[3, 0, 8]), ValueError, r"num_points must be positive"),
        (lambda v, l, w: dict(num_points=[3.0, 6, 2]), TypeError, r"num_points\[0\] must be an int"),
        (lambda v, l, w: dict(spatial_shapes=[(4, 8), (8, 2), (0, 5)]), ValueError, r"spatial_shapes\[2\] must be positive"),
        (lambda v, l, w: dict(spatial_shapes=[(4, 8), (8, 2), (-3, -5)]), ValueError, r"spatial_shapes\[2\] must be positive"),
        (lambda v, l, w: dict(spatial_shapes=[(4, 8), (8, 2), (3,)]), ValueError, r"spatial_shapes\[2\] must be a \(height, width\) pair"),
        (lambda v, l, w: dict(spatial_shapes=[]), ValueError, r"at least one level"),
        (lambda v, l, w: dict(spatial_shapes=torch.tensor(SHAPES, dtype=torch.float32)), TypeError, r"spatial_shapes must be an integer tensor"),
        (lambda v, l, w: dict(spatial_shapes=torch.tensor(SHAPES).flatten()), ValueError, r"spatial_shapes must have shape \(L, 2\)"),
        (lambda v, l, w: dict(spatial_shapes="4x8"), TypeError, r"spatial_shapes must be a sequence"),
        (lambda v, l, w: dict(value=v.float()), TypeError, r"sampling_locations has dtype torch.float64 but value has torch.float32"),
        (lambda v, l, w: dict(attention_weights=w.half()), TypeError, r"attention_weights has dtype torch.float16"),
        (lambda v, l, w: dict(value=v.long(), sampling_locations=l.long(), attention_weights=w.long()), TypeError,
         r"value must be float16, bfloat16, float32 or float64, got torch.int64"),
        (lambda v, l, w: dict(method="bilinear"), ValueError, r"method must be one of \('default', 'discrete'\), got 'bilinear'"),
        (lambda v, l, w: dict(backend="fast"), ValueError, r"backend must be one of"),
        (lambda v, l, w: dict(sampling_locations=l.to("meta")), ValueError, r"sampling_locations is on meta but value is on cpu"),
        # Equal to valid arguments under ==, so a cache of checked calls keyed by value would let them through.
        (lambda v, l, w: dict(spatial_shapes=[(4.0, 8), (8, 2), (3, 5)]), TypeError, r"spatial_shapes\[0\]\[0\] must be an int"),
        (lambda v, l, w: dict(num_points=[3, 6, 2.0]), TypeError, r"num_points\[2\] must be an int"),
        (lambda v, l, w: dict(num_points=[3, 6, True]), TypeError, r"num_points\[2\] must be an int, got bool"),
    ],
)
@pytest.mark.parametrize("after_a_good_call", [False, True], ids=["first", "after-good"])
def test_bad_input_is_named(inputs, overrides, error, message, after_a_good_call):
    if after_a_good_call:  # the same tensors checked and run once: a remembered call must not excuse this one
        call(inputs)
    with pytest.raises(error, match=message):
        call(inputs, **overrides(*inputs))


def test_spatial_shapes_forms_are_equivalent(inputs):
    expected = call(inputs)
    for shapes in (torch.tensor(SHAPES), torch.tensor(SHAPES, dtype=torch.int32), [list(s) for s in SHAPES], tuple(SHAPES)):
        assert torch.equal(call(inputs, spatial_shapes=shapes), expected)
    assert torch.equal(call(inputs, spatial_shapes=torch.tensor(SHAPES)), expected)


def test_single_int_num_points():
    value, locations, weights = make_inputs(points=[2, 2, 2])
    expected = ms_deform_attn(value, SHAPES, locations, weights, [2, 2, 2])
    assert torch.equal(ms_deform_attn(value, SHAPES, locations, weights, 2), expected)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in ("cpu", "cuda")])
def test_raw_op_rejects_bad_shapes_without_crashing(backend, device):
    """The C++ ops check their inputs themselves, so a direct torch.ops call cannot read out of bounds."""
    value, locations, weights = make_inputs(device=device)
    op = torch.ops.rtdetrv2_kernels.ms_deform_attn_forward
    flat = [s for shape in SHAPES for s in shape]
    with pytest.raises(RuntimeError, match=re.escape("spatial shapes sum to")):
        op(value, [4, 8, 8, 2, 3, 6], locations, weights, POINTS, "default")
    with pytest.raises(RuntimeError, match="num_points"):
        op(value, flat, locations, weights, POINTS[:2], "default")
    with pytest.raises(RuntimeError, match="sampling_locations must be"):
        op(value, flat, locations[:, :, :, :5], weights, POINTS, "default")
    with pytest.raises(RuntimeError, match="method must be"):
        op(value, flat, locations, weights, POINTS, "nearest")



# The Triton ops rerun none of ms_deform_attn's checks, only those their kernels' memory safety needs (as the C++
# ops do): a direct call must still fail clearly, before any launch. Each case: the op, its arguments from
# (v, l, w) = make_inputs(), a grad_output g for them and reference boxes r, and the message.
FORWARD, BACKWARD = "triton_ms_deform_attn_forward", "triton_ms_deform_attn_backward"
FUSED_FORWARD, FUSED_BACKWARD = "triton_ms_deform_attn_fused_forward", "triton_ms_deform_attn_fused_backward"
TRITON_OP_CASES = {
    "rows": (FORWARD, lambda v, l, w, g, r: (v, [4, 8, 8, 2, 3, 6], l, w, POINTS, "default"),
             r"value has S=63 rows but spatial_shapes \[4, 8, 8, 2, 3, 6\] sum to 66"),
    # Negative sizes whose products sum to value's rows: the kernels would index before the level.
    "negative-level": (FORWARD, lambda v, l, w, g, r: (v, [4, 8, 8, 2, -3, -5], l, w, POINTS, "default"),
                       r"must be positive"),
    "odd-shapes": (FORWARD, lambda v, l, w, g, r: (v, [4, 8, 8, 2, 3], l, w, POINTS, "default"),
                   r"spatial_shapes must be \(height, width\) pairs"),
    "num-points": (FORWARD, lambda v, l, w, g, r: (v, FLAT_SHAPES, l, w, [3, 8], "default"), r"one count per level"),
    "zero-points": (FORWARD, lambda v, l, w, g, r: (v, FLAT_SHAPES, l, w, [3, 8, 0], "default"), r"must be positive"),
    "locations": (FORWARD, lambda v, l, w, g, r: (v, FLAT_SHAPES, l[..., :10, :], w, POINTS, "default"),
                  r"sampling_locations must have shape \(B, Q, H, P, 2\) = \(2, Q, 3, 11, 2\)"),
    "weights": (FORWARD, lambda v, l, w, g, r: (v, FLAT_SHAPES, l, w[:, :4], POINTS, "default"),
                r"attention_weights must have shape \(B, Q, H, P\) = \(2, 5, 3, 11\)"),
    "value": (FORWARD, lambda v, l, w, g, r: (v[0], FLAT_SHAPES, l, w, POINTS, "default"),
              r"value must have shape \(B, S, H, C\)"),
    "method": (FORWARD, lambda v, l, w, g, r: (v, FLAT_SHAPES, l, w, POINTS, "nearest"), r"method must be one of"),
    "grad-output": (BACKWARD, lambda v, l, w, g, r: (g[..., :-1], v, FLAT_SHAPES, l, w, POINTS, "default"),
                    r"grad_output must have shape \(B, Q, H\*C\) = \(2, 5, 21\)"),
    "backward-rows": (BACKWARD, lambda v, l, w, g, r: (g, v[:, 1:], FLAT_SHAPES, l, w, POINTS, "default"),
                      r"value has S=62 rows"),
    "reference": (FUSED_FORWARD,
                  lambda v, l, w, g, r: (v, FLAT_SHAPES, r.expand(2, 5, 2, 4), l, w, POINTS, 0.5, "default"),
                  r"reference_points must have shape \(B, Q, 1 or L, 4 or 2\) with B=2, Q=5, L=3"),
    "offsets": (FUSED_FORWARD, lambda v, l, w, g, r: (v, FLAT_SHAPES, r, l[:1], w, POINTS, 0.5, "default"),
                r"sampling_offsets must have shape"),
    "fused-grad-output": (FUSED_BACKWARD,
                          lambda v, l, w, g, r: (g[:, :4], v, FLAT_SHAPES, r, l, w, POINTS, 0.5, "default"),
                          r"grad_output must have shape"),
}


@pytest.mark.parametrize("case", list(TRITON_OP_CASES))
def test_raw_triton_op_rejects_bad_shapes_before_launching(monkeypatch, case):
    if "triton" not in backends_for("cpu"):
        pytest.skip("the triton backend does not run on the CPU here")
    from rtdetrv2_kernels import triton_ms_deform_attn as kernels

    def launch(*arguments, **keywords):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(kernels, "_launch", launch)
    op, arguments, message = TRITON_OP_CASES[case]
    value, locations, weights = make_inputs(batch=2, queries=5, heads=3, channels=7)
    grad_output = torch.randn(2, 5, 21, dtype=torch.float64)
    boxes = torch.rand(2, 5, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        getattr(torch.ops.rtdetrv2_kernels, op)(*arguments(value, locations, weights, grad_output, boxes))


# ------------------------------------------------------------------------------------------------------------
# Tensors on several devices in a direct call of an op. A meta tensor among CPU ones makes the dispatcher run
# the fake kernel, which returned uninitialized memory on value's device; the C++ and Triton ops alike.
def _raw_op_arguments(op_name: str) -> list:
    """The arguments of torch.ops.rtdetrv2_kernels.<op_name>, by its schema's names, for a valid call."""
    value, locations, weights = make_inputs(batch=2, queries=5, heads=3, channels=7)
    tensor_levels = op_name.endswith("_tensor_levels")
    known = dict(
        value=value, sampling_locations=locations, attention_weights=weights, sampling_offsets=locations,
        attention_logits=weights, reference_points=torch.rand(2, 5, 1, 4, dtype=torch.float64),
        grad_output=torch.randn(2, 5, 21, dtype=torch.float64), num_points=POINTS, offset_scale=0.5,
        method="default", spatial_shapes=torch.tensor(SHAPES) if tensor_levels else FLAT_SHAPES,
        level_start_index=torch.tensor([0, 32, 48]),
    )
    schema = getattr(torch.ops.rtdetrv2_kernels, op_name).default._schema
    return [known[argument.name] for argument in schema.arguments]


def _raw_op_names() -> list[str]:
    names = [f"ms_deform_attn_{kind}{form}" for form in ("", "_tensor_levels") for kind in ("forward", "backward")]
    names += ["ms_deform_attn_fused_forward", "ms_deform_attn_fused_backward"]
    if "triton" in backends_for("cpu"):
        names += [f"triton_ms_deform_attn_{fused}{kind}" for fused in ("", "fused_") for kind in ("forward", "backward")]
    return names


def _mixed_device_cases():
    for op_name in _raw_op_names():
        schema = getattr(torch.ops.rtdetrv2_kernels, op_name).default._schema
        for argument in schema.arguments:
            if argument.type.kind() == "TensorType":
                yield pytest.param(op_name, argument.name, id=f"{op_name}-{argument.name}")


@pytest.mark.parametrize("op_name,moved", list(_mixed_device_cases()))
def test_raw_ops_reject_tensors_on_several_devices(op_name, moved):
    op = getattr(torch.ops.rtdetrv2_kernels, op_name)
    schema = op.default._schema
    arguments = _raw_op_arguments(op_name)
    position = [a.name for a in schema.arguments].index(moved)
    arguments[position] = arguments[position].to("meta")
    if moved == "value":  # every other tensor is then the one on another device; the first is named
        other = next(a.name for a in schema.arguments if a.type.kind() == "TensorType" and a.name != "value")
        message = rf"{other} is on cpu but value is on meta"
    else:
        message = rf"{moved} is on meta but value is on cpu"
    with pytest.raises(ValueError, match=message):
        op(*arguments)


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in backends_for("cuda"), reason="needs a GPU")
def test_raw_cuda_ops_name_the_tensor_on_another_device():
    """The C++ checks themselves (csrc/ms_deform_attn.h), which no fake kernel precedes: value on the GPU,
    one other tensor on the CPU, for each tensor of each C++ op (grad_output included)."""
    for op_name in [name for name in _raw_op_names() if not name.startswith("triton")]:
        schema = getattr(torch.ops.rtdetrv2_kernels, op_name).default._schema
        names = [a.name for a in schema.arguments]
        for moved in names:
            arguments = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _raw_op_arguments(op_name)]
            if not isinstance(arguments[names.index(moved)], torch.Tensor) or moved == "value":
                continue
            arguments[names.index(moved)] = arguments[names.index(moved)].cpu()
            with pytest.raises((ValueError, RuntimeError), match=rf"{moved} is on cpu but value is on cuda"):
                getattr(torch.ops.rtdetrv2_kernels, op_name)(*arguments)


def test_meta_level_tables_are_named():
    value, locations, weights = make_inputs()
    with pytest.raises(ValueError, match="spatial_shapes is on the meta device"):
        ms_deform_attn(value, torch.tensor(SHAPES, device="meta"), locations, weights, POINTS)
    from rtdetrv2_kernels import compat

    value, locations, weights = make_inputs(points=[2, 2, 2])
    locations, weights = locations.view(2, 5, 3, 3, 2, 2), weights.view(2, 5, 3, 3, 2)
    starts = torch.tensor([0, 32, 48])
    for backend in backends_for("cpu"):
        with pytest.raises(ValueError, match="spatial_shapes is on the meta device"):
            compat.ms_deform_attn_v1(value, torch.tensor(SHAPES, device="meta"), starts, locations, weights,
                                     backend=backend)
        for shapes in (SHAPES, torch.tensor(SHAPES)):
            with pytest.raises(ValueError, match="level_start_index is on the meta device"):
                compat.ms_deform_attn_v1(value, shapes, starts.to("meta"), locations, weights, backend=backend)


@pytest.mark.parametrize("sparse", ["value", "sampling_locations", "attention_weights"])
def test_sparse_tensors_are_named(inputs, sparse):
    value, locations, weights = inputs
    tensors = dict(value=value, sampling_locations=locations, attention_weights=weights)
    tensors[sparse] = tensors[sparse].to_sparse()
    with pytest.raises(TypeError, match=rf"{sparse} must be a dense \(strided\) tensor .* got layout torch.sparse_coo"):
        call(inputs, **tensors)


@needs_cpu_kernels
def test_raw_tensor_levels_op_names_a_bad_value():
    value, locations, weights = make_inputs()
    op = torch.ops.rtdetrv2_kernels.ms_deform_attn_forward_tensor_levels
    with pytest.raises(ValueError, match=r"value must be \(B, S, H, C\)"):
        op(value[0, :, 0], torch.tensor(SHAPES), torch.tensor([0, 32, 48]), locations, weights, POINTS, "default")
