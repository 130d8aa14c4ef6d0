"""Fake (meta) kernels and the autograd wiring shared by every forward/backward op pair of this package:
the C++ ops (registered in _registration.py) and the Triton ops, plain and fused alike.

Every pair follows one convention: forward(value, spatial_shapes, <per-point tensors>, num_points, ...)
returns (B, Q, H*C), and backward(grad_output, <the forward's arguments>) returns the gradients of the
forward's tensor arguments, in order.
"""

from __future__ import annotations

import torch


def forward_fake(value, spatial_shapes, per_point, *options):
    """(B, Q, H*C): Q is the second size of the first per-point tensor (locations or reference points)."""
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, per_point.shape[1], heads * channels))


def backward_fake(grad_output, *inputs):
    return tuple(t.new_empty(t.shape) for t in inputs if isinstance(t, torch.Tensor))


def register_autograd(forward_op, backward_op) -> None:
    """Makes backward_op the gradient of forward_op (a qualified name or a custom op)."""

    def setup_context(ctx, inputs, output):
        ctx.tensor_positions = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_positions))
        ctx.options = [None if isinstance(x, torch.Tensor) else x for x in inputs]

    def backward(ctx, grad_output):
        inputs = list(ctx.options)
        for position, tensor in zip(ctx.tensor_positions, ctx.saved_tensors):
            inputs[position] = tensor
        grads = [None] * len(inputs)
        for position, grad in zip(ctx.tensor_positions, backward_op(grad_output, *inputs)):
            grads[position] = grad
        return tuple(grads)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


OP_PAIRS = (
    ("ms_deform_attn_forward", "ms_deform_attn_backward"),
    ("ms_deform_attn_fused_forward", "ms_deform_attn_fused_backward"),
)


def register_op_pairs(namespace: str) -> None:
    """Fake kernels and autograd for the four ops of csrc/ms_deform_attn_schema.h, as defined under
    `namespace` (rtdetrv2_kernels, or the test suite's emulated CUDA builds)."""
    ops = getattr(torch.ops, namespace)
    for forward, backward in OP_PAIRS:
        torch.library.register_fake(f"{namespace}::{forward}")(forward_fake)
        torch.library.register_fake(f"{namespace}::{backward}")(backward_fake)
        register_autograd(f"{namespace}::{forward}", getattr(ops, backward))
