"""Drop-in adapters: the calling conventions of other multi-scale deformable attention code, run on this
package's op (see docs/integrations.md).

- ``MSDeformAttnFunction.apply`` / ``ms_deform_attn_v1``: Deformable DETR's layout, with ``level_start_index``
  and locations of shape (B, Q, H, L, P, 2); ``MultiScaleDeformableAttnFunction.apply``: mmcv's, the same
  after casting locations and weights to value's dtype.
- ``deformable_attention_core_func``: RT-DETR (v1)'s core, the same locations without level_start_index.
- ``deformable_attention_core_func_v2``: the attention core of the original RT-DETRv2, D-FINE, DEIM / DEIMv2
  and lightly-train code, including D-FINE's value given as one tensor per level and DEIM's value_shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import rtdetrv2_kernels as _package  # the op is looked up per call, so a test can watch it

from ._validation import (
    _as_int,
    _check_tensor,
    check_dtypes_and_devices,
    check_readable,
    check_shapes_tensor,
    level_shapes,
    widen_under_autocast,
)
from .backends import resolve_backend, tensor_levels_implementation
from .reference import levels_in_order

__all__ = [
    "MSDeformAttnFunction",
    "MultiScaleDeformableAttnFunction",
    "ms_deform_attn_v1",
    "deformable_attention_core_func",
    "deformable_attention_core_func_v2",
]


# ----------------------------------------------------------------------------------------------------------
# Deformable DETR / mmcv: value (B, S, H, C), spatial_shapes (L, 2), level_start_index (L,),
# sampling_locations (B, Q, H, L, P, 2), attention_weights (B, Q, H, L, P).
# ----------------------------------------------------------------------------------------------------------


def _check_start_index(level_start_index, num_levels: int, value) -> None:
    if isinstance(level_start_index, torch.Tensor):
        check_readable("level_start_index", level_start_index, value)
        if level_start_index.dim() != 1:
            raise ValueError(f"level_start_index must have shape (L,), got {tuple(level_start_index.shape)}")
        if level_start_index.dtype.is_floating_point or level_start_index.dtype.is_complex \
                or level_start_index.dtype == torch.bool:
            raise TypeError(f"level_start_index must be an integer tensor, got {level_start_index.dtype}")
        length = level_start_index.shape[0]
    elif isinstance(level_start_index, Sequence) and not isinstance(level_start_index, str):
        length = len(level_start_index)
    else:
        raise TypeError(
            f"level_start_index must be an integer tensor of shape (L,) or a sequence of ints, "
            f"got {type(level_start_index).__name__}"
        )
    if length != num_levels:
        raise ValueError(f"level_start_index has {length} entries but spatial_shapes has {num_levels} levels")


def _read_layout(spatial_shapes, level_start_index, value):
    """(level shapes as Python ints, level starts as Python ints, or the starts tensor where reading it
    would cost a host-device sync that reading the shapes does not already pay)."""
    if isinstance(spatial_shapes, torch.Tensor) and spatial_shapes.device.type != "cpu":
        check_readable("spatial_shapes", spatial_shapes)
        _check_start_index(level_start_index, check_shapes_tensor(spatial_shapes), value)
        if isinstance(level_start_index, torch.Tensor):
            # The shapes must come to the host anyway: bring the starts in the same copy (one sync for both).
            both = torch.cat((spatial_shapes.reshape(-1), level_start_index.to(spatial_shapes)))
            both = both.tolist()
            num_levels = spatial_shapes.shape[0]
            pairs = [both[2 * i : 2 * i + 2] for i in range(num_levels)]
            return level_shapes(pairs), [int(s) for s in both[2 * num_levels :]]
    shapes = level_shapes(spatial_shapes)
    _check_start_index(level_start_index, len(shapes), value)
    if isinstance(level_start_index, torch.Tensor):
        if level_start_index.device.type == "cpu":
            return shapes, level_start_index.tolist()
        return shapes, level_start_index  # stays on the device: see _gather_levels_on_device
    return shapes, [_as_int(s, f"level_start_index[{i}]") for i, s in enumerate(level_start_index)]


def _gather_levels_on_device(value: torch.Tensor, shapes, starts: torch.Tensor) -> torch.Tensor:
    """As levels_in_order, with the starts left on the device: always one gather (a copy of value) and
    no host sync. The starts are not range-checked here (that would need their values); an out-of-range
    start fails inside index_select."""
    sizes = [h * w for h, w in shapes]
    level_of_row = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    first_row = torch.tensor([sum(sizes[:level]) for level in range(len(sizes))])
    offset_in_level = torch.arange(sum(sizes)) - first_row[level_of_row]
    device = value.device
    rows = starts.to(device=device, dtype=torch.long)[level_of_row.to(device)] + offset_in_level.to(device)
    return value.index_select(1, rows)


def _check_v1_tensors(value, sampling_locations, attention_weights, num_levels: int) -> None:
    _check_tensor("value", value, "(B, S, H, C)")
    _check_tensor("sampling_locations", sampling_locations, "(B, Q, H, L, P, 2)")
    _check_tensor("attention_weights", attention_weights, "(B, Q, H, L, P)")
    batch, _, heads, _ = value.shape
    queries, points = sampling_locations.shape[1], sampling_locations.shape[4]
    expected = (batch, queries, heads, num_levels, points, 2)
    if tuple(sampling_locations.shape) != expected:
        raise ValueError(
            f"sampling_locations must have shape (B, Q, H, L, P, 2) = {expected} for value of shape "
            f"{tuple(value.shape)} and {num_levels} levels, got {tuple(sampling_locations.shape)}"
        )
    if tuple(attention_weights.shape) != expected[:5]:
        raise ValueError(
            f"attention_weights must have shape (B, Q, H, L, P) = {expected[:5]}, "
            f"got {tuple(attention_weights.shape)}"
        )


def _v1_with_level_tensors(run, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """ms_deform_attn_v1 on a backend whose kernels read the level table where it lives: shapes and starts
    go to value's device as int64 tensors (a conversion there, or a copy from the host of starts given as
    ints), never to the host, so nothing waits for the device and torch.compile traces the call whole."""
    num_levels = check_shapes_tensor(spatial_shapes)
    if num_levels == 0:
        raise ValueError("spatial_shapes must hold at least one level")
    check_readable("spatial_shapes", spatial_shapes, value)
    _check_start_index(level_start_index, num_levels, value)
    value, sampling_locations, attention_weights = widen_under_autocast(value, sampling_locations, attention_weights)
    _check_v1_tensors(value, sampling_locations, attention_weights, num_levels)
    check_dtypes_and_devices(value, {"sampling_locations": sampling_locations, "attention_weights": attention_weights})
    shapes = spatial_shapes.to(device=value.device, dtype=torch.long)
    if isinstance(level_start_index, torch.Tensor):
        starts = level_start_index.to(device=value.device, dtype=torch.long)
    else:
        starts = torch.tensor([_as_int(s, f"level_start_index[{i}]") for i, s in enumerate(level_start_index)],
                              dtype=torch.long, device=value.device)
    points = [sampling_locations.shape[4]] * num_levels
    # (B, Q, H, L, P, ...) -> (B, Q, H, L*P, ...): level-major, which is the op's point order.
    return run(value, shapes, starts, sampling_locations.flatten(3, 4), attention_weights.flatten(3, 4), points,
               "default")


def ms_deform_attn_v1(
    value: torch.Tensor,
    spatial_shapes,
    level_start_index,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention in Deformable DETR's layout; returns (B, Q, H*C).

    Args:
        value: (B, S, H, C). Level l occupies rows level_start_index[l] .. + H_l*W_l - 1 (row-major); levels
            may sit in any order, and rows outside every level are ignored.
        spatial_shapes: (L, 2) integer tensor or L (height, width) pairs.
        level_start_index: (L,) integer tensor or L ints.
        sampling_locations: (B, Q, H, L, P, 2), (x, y) normalized to each level.
        attention_weights: (B, Q, H, L, P), used as given.
        backend: as for :func:`rtdetrv2_kernels.ms_deform_attn`.

    A spatial_shapes tensor stays where it is on the "cpu" and "cuda" backends: their kernels read the level
    table from it, so a GPU call costs no host-device sync, can be captured in a CUDA graph, and
    torch.compile(fullgraph=True) traces it. The host cannot check that table without reading it: on a GPU
    a level that is empty or does not lie wholly inside value's rows contributes zero (CPU tensors are read
    and checked, with errors as for lists). Other backends ("triton", "torch") read the tensor on the host.

    With spatial_shapes as pairs of ints (the fast path), starts on the host are checked there, and levels
    already in order cost nothing; device starts are used without reading them: value is then gathered into
    order on the device (one copy of value, no sync).
    """
    if isinstance(spatial_shapes, torch.Tensor) and isinstance(value, torch.Tensor):
        run = tensor_levels_implementation(
            resolve_backend(backend, value.device.type, value.dtype, check_shapes_tensor(spatial_shapes)))
        if run is not None:
            return _v1_with_level_tensors(run, value, spatial_shapes, level_start_index, sampling_locations,
                                          attention_weights)
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"compat.ms_deform_attn_v1: spatial_shapes as a tensor under torch.compile needs a backend whose "
                f"kernels read it on the device ('cpu' or 'cuda'); backend {backend!r} resolved to one that reads "
                "it on the host. Pass the shapes as a list of (height, width) pairs, or choose 'cuda'/'cpu'."
            )
    shapes, starts = _read_layout(spatial_shapes, level_start_index, value)
    _check_v1_tensors(value, sampling_locations, attention_weights, len(shapes))
    if isinstance(starts, torch.Tensor):
        value = _gather_levels_on_device(value, shapes, starts)
    else:
        value = levels_in_order(value, shapes, starts)
    points = sampling_locations.shape[4]
    return _package.ms_deform_attn(
        value, shapes, sampling_locations.flatten(3, 4), attention_weights.flatten(3, 4), points, backend=backend
    )


class MSDeformAttnFunction:
    """Stands in for Deformable DETR's ``MSDeformAttnFunction``: ``apply(value, spatial_shapes,
    level_start_index, sampling_locations, attention_weights, im2col_step)``. Differentiable through the op's
    own autograd; im2col_step (the original CUDA kernel's batch chunking) is accepted and ignored."""

    @staticmethod
    def apply(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
              im2col_step=64):
        return ms_deform_attn_v1(
            value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights
        )


class MultiScaleDeformableAttnFunction:
    """Stands in for mmcv's ``MultiScaleDeformableAttnFunction``: as :class:`MSDeformAttnFunction`, after
    casting sampling_locations and attention_weights to value's dtype, as mmcv does (so an fp16 value with
    fp32 locations runs in fp16 there too)."""

    @staticmethod
    def apply(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
              im2col_step=64):
        if isinstance(value, torch.Tensor):
            if isinstance(sampling_locations, torch.Tensor):
                sampling_locations = sampling_locations.type_as(value)
            if isinstance(attention_weights, torch.Tensor):
                attention_weights = attention_weights.type_as(value)
        return ms_deform_attn_v1(
            value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights
        )


def flat_points(sampling_locations: torch.Tensor, num_levels: int) -> tuple[torch.Tensor, int]:
    """Locations (B, Q, H, L, P, 2) or (B, Q, H, L*P, 2) as (B, Q, H, L*P, 2), level-major (the op's order),
    and P: the layouts of codebases with the same point count on every level."""
    if sampling_locations.dim() == 6:
        return sampling_locations.flatten(3, 4), sampling_locations.shape[4]
    points, remainder = divmod(sampling_locations.shape[3], num_levels)
    if remainder:
        raise ValueError(f"sampling_locations has {sampling_locations.shape[3]} points, not the same number for "
                         f"each of the {num_levels} levels")
    return sampling_locations, points


def deformable_attention_core_func(value, value_spatial_shapes, sampling_locations, attention_weights, *,
                                   backend: str | None = None) -> torch.Tensor:
    """RT-DETR (v1)'s attention core (and transformers' Mask2Former / OneFormer one): value (B, S, H, C),
    value_spatial_shapes L (height, width) pairs or an (L, 2) tensor, sampling_locations (B, Q, H, L, P, 2),
    attention_weights (B, Q, H, L, P); returns (B, Q, H*C), the same points on every level."""
    _check_tensor("sampling_locations", sampling_locations, "(B, Q, H, L, P, 2)")
    _check_tensor("attention_weights", attention_weights, "(B, Q, H, L, P)")
    return _package.ms_deform_attn(value, value_spatial_shapes, sampling_locations.flatten(3, 4),
                                   attention_weights.flatten(3, 4), sampling_locations.shape[4], backend=backend)


# ----------------------------------------------------------------------------------------------------------
# RT-DETRv2 / D-FINE / DEIM: deformable_attention_core_func_v2(value, value_spatial_shapes,
# sampling_locations (B, Q, H, P, 2), attention_weights (B, Q, H, P), num_points_list, method)
# ----------------------------------------------------------------------------------------------------------


def _join_levels(value_levels, shapes) -> torch.Tensor:
    """D-FINE's per-level value, (B, H, C, H_l*W_l) each, as one (B, S, H, C) tensor (one copy)."""
    if len(value_levels) != len(shapes):
        raise ValueError(f"value has {len(value_levels)} levels but value_spatial_shapes has {len(shapes)}")
    first = value_levels[0]
    for level, (tensor, (height, width)) in enumerate(zip(value_levels, shapes)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"value[{level}] must be a torch.Tensor, got {type(tensor).__name__}")
        expected = (*first.shape[:3], height * width) if first.dim() == 4 else None
        if tensor.dim() != 4 or tuple(tensor.shape) != expected:
            raise ValueError(
                f"value[{level}] must have shape (B, H, C, H_l*W_l) = {expected} (level {level} is "
                f"{height}x{width}), got {tuple(tensor.shape)}"
            )
    return torch.cat([tensor.permute(0, 3, 1, 2) for tensor in value_levels], dim=1)


def _clamp_like_original(locations: torch.Tensor, shapes, num_points) -> torch.Tensor:
    """The original discrete sampling clamps the x pixel to H_l - 1 too (not W_l - 1). On a level wider
    than tall that caps x below the right-hand columns; capping the location reproduces it. (Taller than
    wide, the original indexes past the row and fails, so there is nothing to reproduce.)"""
    if all(width <= height for height, width in shapes):
        return locations
    # floor(x * W_l + 0.5) == H_l - 1 at x = (H_l - 0.75) / W_l, a quarter pixel from either rounding edge.
    limits = [(height - 0.75) / width if width > height else math.inf
              for (height, width), count in zip(shapes, num_points) for _ in range(count)]
    limit = torch.tensor(limits, dtype=locations.dtype, device=locations.device)
    return torch.stack((torch.minimum(locations[..., 0], limit), locations[..., 1]), dim=-1)


def deformable_attention_core_func_v2(
    value,
    value_spatial_shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points_list,
    method: str = "default",
    value_shape: str | None = None,
    *,
    original_discrete_clamp: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """The attention core of the original RT-DETRv2, D-FINE, DEIM / DEIMv2 and lightly-train code on this
    package's op.

    Args:
        value: (B, S, H, C) as RT-DETRv2 passes it, or D-FINE's sequence of per-level tensors of shape
            (B, H, C, H_l*W_l) (joined into one tensor first: one copy of value per call).
        value_spatial_shapes: L (height, width) pairs (a list avoids a host sync; a tensor works too).
        sampling_locations: (B, Q, H, sum(num_points_list), 2), attention_weights (B, Q, H, sum(...)).
        num_points_list: points per level.
        method: "default" (bilinear), "discrete", or lightly-train's "bilinear_gather" (bilinear sampling
            written as corner gathers for export: the same values as "default", which it runs; an ONNX
            export writes the op as gathers by default, see docs/integrations.md, "Deployment").
        value_shape: DEIM's argument saying which of value's two forms it is: "default", the per-level
            sequence, or "reshape", one (B, S, H, C) tensor. None accepts either.
        original_discrete_clamp: discrete only. True (default) reproduces the original code on levels wider
            than tall, which clamps the x pixel to H_l - 1; False clamps each axis into its own size, as
            transformers and :func:`rtdetrv2_kernels.ms_deform_attn` do. Square levels agree either way.
        backend: as for :func:`rtdetrv2_kernels.ms_deform_attn`.

    Returns:
        (B, Q, H*C), the values of the original (which returns a transposed view; this is contiguous).
    """
    if value_shape not in (None, "default", "reshape"):
        raise ValueError(f"value_shape must be 'default' (value as per-level tensors) or 'reshape' (one "
                         f"(B, S, H, C) tensor), got {value_shape!r}")
    if value_shape is not None and isinstance(value, torch.Tensor) != (value_shape == "reshape"):
        expected = "one (B, S, H, C) tensor" if value_shape == "reshape" else "a sequence of (B, H, C, H_l*W_l) tensors"
        raise TypeError(f"value_shape={value_shape!r} needs value as {expected}, got {type(value).__name__}")
    if method == "bilinear_gather":
        method = "default"
    shapes = level_shapes(value_spatial_shapes)
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError("value must hold at least one level")
        value = _join_levels(value, shapes)
    elif not isinstance(value, torch.Tensor):
        raise TypeError(
            f"value must be a (B, S, H, C) tensor or a sequence of (B, H, C, H_l*W_l) tensors, "
            f"got {type(value).__name__}"
        )
    if method == "discrete" and isinstance(sampling_locations, torch.Tensor):
        # The original rounds the locations to integers, which passes them no gradient (and freezes the
        # offset layers); the op's zeros would let weight decay move those layers.
        sampling_locations = sampling_locations.detach()
    if method == "discrete" and original_discrete_clamp and isinstance(sampling_locations, torch.Tensor) \
            and sampling_locations.dim() == 5 and isinstance(num_points_list, Sequence):
        if len(num_points_list) == len(shapes) and sampling_locations.shape[3] == sum(num_points_list):
            # (otherwise the op reports the mismatch)
            sampling_locations = _clamp_like_original(sampling_locations, shapes, num_points_list)
    return _package.ms_deform_attn(
        value, shapes, sampling_locations, attention_weights, num_points_list, method=method, backend=backend
    )
