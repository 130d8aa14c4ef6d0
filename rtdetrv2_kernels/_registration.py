"""Fake (meta) kernels and the autograd formula for the C++ ops defined in csrc/ms_deform_attn.cpp.

Imported once the library that defines the ops has been loaded (see _extension.load).
"""

from __future__ import annotations

import torch

_OPS = torch.ops.rtdetrv2_kernels


@torch.library.register_fake("rtdetrv2_kernels::ms_deform_attn_forward")
def _forward_fake(value, spatial_shapes, sampling_locations, attention_weights, num_points, method):
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * channels))


@torch.library.register_fake("rtdetrv2_kernels::ms_deform_attn_backward")
def _backward_fake(grad_output, value, spatial_shapes, sampling_locations, attention_weights, num_points, method):
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, sampling_locations, attention_weights, num_points, method = inputs
    ctx.save_for_backward(value, sampling_locations, attention_weights)
    ctx.spatial_shapes = spatial_shapes
    ctx.num_points = num_points
    ctx.method = method


def _backward(ctx, grad_output):
    value, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = _OPS.ms_deform_attn_backward(
        grad_output, value, ctx.spatial_shapes, sampling_locations, attention_weights, ctx.num_points, ctx.method
    )
    return grad_value, None, grad_locations, grad_weights, None, None


torch.library.register_autograd(
    "rtdetrv2_kernels::ms_deform_attn_forward", _backward, setup_context=_setup_context
)


@torch.library.register_fake("rtdetrv2_kernels::ms_deform_attn_fused_forward")
def _fused_forward_fake(value, spatial_shapes, reference_points, sampling_offsets, attention_logits, num_points,
                        offset_scale, method):
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_offsets.shape[1], heads * channels))


@torch.library.register_fake("rtdetrv2_kernels::ms_deform_attn_fused_backward")
def _fused_backward_fake(grad_output, value, spatial_shapes, reference_points, sampling_offsets, attention_logits,
                         num_points, offset_scale, method):
    return (
        value.new_empty(value.shape),
        reference_points.new_empty(reference_points.shape),
        sampling_offsets.new_empty(sampling_offsets.shape),
        attention_logits.new_empty(attention_logits.shape),
    )


def _fused_setup_context(ctx, inputs, output):
    value, spatial_shapes, reference_points, sampling_offsets, attention_logits, num_points, offset_scale, method = inputs
    ctx.save_for_backward(value, reference_points, sampling_offsets, attention_logits)
    ctx.arguments = (spatial_shapes, num_points, offset_scale, method)


def _fused_backward(ctx, grad_output):
    value, reference_points, sampling_offsets, attention_logits = ctx.saved_tensors
    spatial_shapes, num_points, offset_scale, method = ctx.arguments
    grad_value, grad_reference, grad_offsets, grad_logits = _OPS.ms_deform_attn_fused_backward(
        grad_output, value, spatial_shapes, reference_points, sampling_offsets, attention_logits, num_points,
        offset_scale, method
    )
    return grad_value, None, grad_reference, grad_offsets, grad_logits, None, None, None


torch.library.register_autograd(
    "rtdetrv2_kernels::ms_deform_attn_fused_forward", _fused_backward, setup_context=_fused_setup_context
)
