"""Fused multi-scale deformable attention for RT-DETRv2, D-FINE, DEIM and Deformable-DETR-style models.

The contract of :func:`ms_deform_attn` is written out in docs/semantics.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _call_cache, _extension
from ._export_options import export_options
from ._validation import check_fused_inputs, check_inputs, check_offset_scale, widen_under_autocast
from .backends import (BACKENDS, ENV_VAR, available_backends, fused_implementation, implementation, resolve_backend,
                       with_levels)
from .reference import ms_deform_attn_fused_reference, ms_deform_attn_reference

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_fused",
    "ms_deform_attn_reference",
    "ms_deform_attn_fused_reference",
    "available_backends",
    "empty_cache",
    "export_options",
    "BACKENDS",
    "ENV_VAR",
]
__version__ = "0.1.0"


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: Sequence[Sequence[int]] | torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points: Sequence[int] | int,
    method: str = "default",
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention with per-level point counts (the RT-DETRv2 layout).

    Args:
        value: (B, S, H, C); S = sum of H_l * W_l, each level flattened row-major, levels in order.
        spatial_shapes: L (height, width) pairs, or an integer tensor of shape (L, 2).
        sampling_locations: (B, Q, H, P, 2) with P = sum(num_points), points level-major; the last dim is
            (x, y) normalized to the level's width and height. Values outside [0, 1] are legal.
        attention_weights: (B, Q, H, P), used as given (no softmax is applied).
        num_points: points per level, e.g. [4, 4, 4] (RT-DETRv2) or [3, 6, 3] (D-FINE), or one int for all.
        method: "default" (bilinear, as grid_sample with zero padding and align_corners=False) or
            "discrete" (the nearest pixel, clamped into the level).
        backend: "cuda", "triton", "cpu", "torch", or None for the fastest one available on the tensors'
            device (the RTDETRV2_KERNELS_BACKEND environment variable overrides that default).

    Returns:
        (B, Q, H*C) in value's dtype; channel index h*C + c. Under torch.autocast, inputs of mixed float dtypes
        are first cast to the widest, which is then the output's dtype (docs/integrations.md, "Autocast").
    """
    key = None if torch.compiler.is_compiling() else _call_cache.signature(
        "plain", (value, sampling_locations, attention_weights), spatial_shapes, num_points, method, backend)
    checked = _call_cache.lookup(key)
    if checked is None:
        value, sampling_locations, attention_weights = widen_under_autocast(value, sampling_locations,
                                                                            attention_weights)
        shapes, points = check_inputs(value, spatial_shapes, sampling_locations, attention_weights, num_points,
                                      method)
        name = resolve_backend(backend, value.device.type, value.dtype, len(shapes))
        checked = points, with_levels(implementation(name), shapes)
        _call_cache.remember(key, checked)
    points, run = checked
    return run(value, sampling_locations, attention_weights, points, method)


def ms_deform_attn_fused(
    value: torch.Tensor,
    spatial_shapes: Sequence[Sequence[int]] | torch.Tensor,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
    num_points: Sequence[int] | int,
    offset_scale: float = 0.5,
    method: str = "default",
    backend: str | None = None,
) -> torch.Tensor:
    """The RT-DETRv2 attention core: softmax and sampling locations, then :func:`ms_deform_attn`.

    Args:
        value, spatial_shapes, num_points, method, backend: as for :func:`ms_deform_attn`.
        reference_points: (B, Q, 1, 4) boxes (cx, cy, w, h) or (B, Q, 1, 2) points, normalized to [0, 1];
            or (B, Q, L, 4 | 2), one per level.
        sampling_offsets: (B, Q, H, P, 2), raw (x, y) offsets.
        attention_logits: (B, Q, H, P), raw; softmax runs over each head's P points (all levels together).
        offset_scale: boxes only: loc = ref_xy + offset / num_points_l * ref_wh * offset_scale (RT-DETRv2).
            Points: loc = ref_xy + offset / (W_l, H_l) (Deformable DETR).

    Returns:
        (B, Q, H*C) in value's dtype (under torch.autocast with mixed float dtypes: the widest, as for
        :func:`ms_deform_attn`). Gradients reach value, sampling_offsets, attention_logits and
        reference_points (discrete: none through the locations, so offsets and references get zeros).

    The "cpu", "cuda" and "triton" backends compute the softmax and the locations inside their kernels;
    "torch" runs them as PyTorch ops before its sampling (docs/semantics.md, "The fused op").
    """
    key = None if torch.compiler.is_compiling() else _call_cache.signature(
        "fused", (value, reference_points, sampling_offsets, attention_logits), spatial_shapes, num_points, method,
        backend)
    checked = _call_cache.lookup(key)
    if checked is None:
        value, reference_points, sampling_offsets, attention_logits = widen_under_autocast(
            value, reference_points, sampling_offsets, attention_logits
        )
        shapes, points = check_fused_inputs(value, spatial_shapes, reference_points, sampling_offsets,
                                            attention_logits, num_points, offset_scale, method)
        name = resolve_backend(backend, value.device.type, value.dtype, len(shapes))
        checked = points, with_levels(fused_implementation(name), shapes)
        _call_cache.remember(key, checked)
    else:
        check_offset_scale(offset_scale)  # a plain number, not part of the signature
    points, run = checked
    return run(value, reference_points, sampling_offsets, attention_logits, points, float(offset_scale), method)


def empty_cache() -> None:
    """Releases the CPU gradient buffers that the ``"cpu"`` backend keeps for reuse.

    A backward whose ``grad_value`` (or its fp32 accumulator) is 32 MiB or larger takes it from a pool that
    keeps up to two such freed buffers mapped, so that the next call does not page-fault a fresh one (see
    docs/semantics.md, "Memory"). This unmaps the idle ones; buffers still held by tensors are unaffected.
    A no-op when the C++ kernels are not loaded. CUDA memory is PyTorch's: use ``torch.cuda.empty_cache()``.
    """
    if _extension.is_loaded("_C"):
        torch.ops.rtdetrv2_kernels.empty_cpu_cache()
