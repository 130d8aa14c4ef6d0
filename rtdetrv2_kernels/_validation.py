"""Argument checks for ms_deform_attn: every message names the argument and what was expected.

Only shapes, dtypes and devices are inspected, never tensor values on a device, so checking costs no
host-device sync (a spatial_shapes tensor on a GPU given to ms_deform_attn is the one exception; see
docs/semantics.md; compat.ms_deform_attn_v1 keeps such a table on the device).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch

METHODS = ("default", "discrete")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1


def _as_int(x, what: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(x).__name__}") from None


def check_shapes_tensor(spatial_shapes: torch.Tensor) -> int:
    """The number of levels of an (L, 2) integer spatial_shapes tensor, checked without reading its values."""
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must have shape (L, 2), got {tuple(spatial_shapes.shape)}")
    if spatial_shapes.dtype.is_floating_point or spatial_shapes.dtype.is_complex or spatial_shapes.dtype == torch.bool:
        raise TypeError(f"spatial_shapes must be an integer tensor, got {spatial_shapes.dtype}")
    return spatial_shapes.shape[0]


def check_readable(name: str, table: torch.Tensor, value=None) -> None:
    """A level table tensor whose values will be read or copied to value's device: not on the meta device
    (which holds no values), unless value is there too (a call that only propagates shapes)."""
    if table.is_meta and not (isinstance(value, torch.Tensor) and value.is_meta):
        raise ValueError(f"{name} is on the meta device, which holds no values to read; pass it as a list of ints "
                         "or a tensor on the CPU or value's device")


def level_shapes(spatial_shapes) -> tuple[tuple[int, int], ...]:
    """spatial_shapes as a tuple of (height, width) pairs of Python ints."""
    if isinstance(spatial_shapes, torch.Tensor):
        check_shapes_tensor(spatial_shapes)
        check_readable("spatial_shapes", spatial_shapes)
        spatial_shapes = spatial_shapes.tolist()
    if not isinstance(spatial_shapes, Sequence) or isinstance(spatial_shapes, str):
        raise TypeError(
            f"spatial_shapes must be a sequence of (height, width) pairs or an int tensor of shape (L, 2), "
            f"got {type(spatial_shapes).__name__}"
        )
    if len(spatial_shapes) == 0:
        raise ValueError("spatial_shapes must hold at least one level")
    shapes = []
    for level, pair in enumerate(spatial_shapes):
        if not isinstance(pair, (Sequence, torch.Tensor)) or len(pair) != 2:
            raise ValueError(f"spatial_shapes[{level}] must be a (height, width) pair, got {pair!r}")
        height = _as_int(pair[0], f"spatial_shapes[{level}][0]")
        width = _as_int(pair[1], f"spatial_shapes[{level}][1]")
        if height <= 0 or width <= 0:
            raise ValueError(f"spatial_shapes[{level}] must be positive, got ({height}, {width})")
        if height * width > _INT32_MAX:
            raise ValueError(f"spatial_shapes[{level}] = ({height}, {width}) has more than 2^31 - 1 pixels")
        shapes.append((height, width))
    return tuple(shapes)


def points_per_level(num_points, num_levels: int) -> tuple[int, ...]:
    """num_points as one positive int per level."""
    if isinstance(num_points, Sequence) and not isinstance(num_points, str):
        points = tuple(_as_int(n, f"num_points[{i}]") for i, n in enumerate(num_points))
        if len(points) != num_levels:
            raise ValueError(
                f"num_points has {len(points)} entries but spatial_shapes has {num_levels} levels; "
                "give one count per level or a single int"
            )
    else:
        points = (_as_int(num_points, "num_points"),) * num_levels
    for level, n in enumerate(points):
        if n <= 0:
            raise ValueError(f"num_points must be positive, got {n} for level {level}")
    return points


def _check_tensor(name: str, tensor, dims: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {dims}, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor of shape {dims}, got layout {tensor.layout}")
    if tensor.dim() != dims.count(",") + 1:
        raise ValueError(f"{name} must have shape {dims}, got {tuple(tensor.shape)}")


def check_inputs(value, spatial_shapes, sampling_locations, attention_weights, num_points, method,
                 names=("sampling_locations", "attention_weights")):
    """Validates all arguments; returns (level shapes, points per level) as tuples of Python ints. `names`
    are what messages call the two per-point tensors (the fused op's offsets and logits take their place)."""
    locations_name, weights_name = names
    _check_tensor("value", value, "(B, S, H, C)")
    _check_tensor(locations_name, sampling_locations, "(B, Q, H, P, 2)")
    _check_tensor(weights_name, attention_weights, "(B, Q, H, P)")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    check_dtypes_and_devices(value, {locations_name: sampling_locations, weights_name: attention_weights})

    shapes = level_shapes(spatial_shapes)
    points = points_per_level(num_points, len(shapes))
    batch, sequence, heads, _ = value.shape
    queries, total_points = sampling_locations.shape[1], sum(points)
    expected_rows = sum(h * w for h, w in shapes)
    if sequence != expected_rows:
        raise ValueError(
            f"value has S={sequence} rows but spatial_shapes {list(shapes)} sum to {expected_rows} (sum of H_l*W_l)"
        )
    expected = (batch, queries, heads, total_points, 2)
    if tuple(sampling_locations.shape) != expected:
        raise ValueError(
            f"{locations_name} must have shape (B, Q, H, P, 2) = {expected} for value of shape "
            f"{tuple(value.shape)} and num_points {list(points)} (P = {total_points}), "
            f"got {tuple(sampling_locations.shape)}"
        )
    if tuple(attention_weights.shape) != expected[:4]:
        raise ValueError(
            f"{weights_name} must have shape (B, Q, H, P) = {expected[:4]}, got {tuple(attention_weights.shape)}"
        )
    return shapes, points


def widen_under_autocast(*tensors):
    """The autocast policy (docs/integrations.md): under torch.autocast enabled for the first tensor's (value's)
    device type, float tensors of mixed dtypes are all cast to the widest (PyTorch's promotion: fp16 with
    bf16 gives fp32). Anything else comes back as given, for the checks to judge: outside autocast mixed
    dtypes stay an error."""
    if not all(isinstance(t, torch.Tensor) and t.dtype in _FLOAT_DTYPES for t in tensors):
        return tensors
    if all(t.dtype == tensors[0].dtype for t in tensors):
        return tensors
    widest = tensors[0].dtype
    for tensor in tensors[1:]:
        widest = torch.promote_types(widest, tensor.dtype)
    device_type = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    return tuple(t.to(widest) for t in tensors)


def check_dtypes_and_devices(value: torch.Tensor, others: dict[str, torch.Tensor]) -> None:
    """value has a float dtype, and every tensor in `others` (by name) value's dtype and device."""
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"value must be float16, bfloat16, float32 or float64, got {value.dtype}")
    for name, tensor in others.items():
        _check_like_value(name, tensor, value)


def _check_like_value(name: str, tensor: torch.Tensor, value: torch.Tensor) -> None:
    if tensor.dtype != value.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but value has {value.dtype}; they must match")
    if tensor.device != value.device:
        raise ValueError(f"{name} is on {tensor.device} but value is on {value.device}; they must match")


def check_fused_inputs(value, spatial_shapes, reference_points, sampling_offsets, attention_logits, num_points,
                       offset_scale, method):
    """check_inputs for ms_deform_attn_fused, plus its reference points and offset scale."""
    shapes, points = check_inputs(value, spatial_shapes, sampling_offsets, attention_logits, num_points, method,
                                  names=("sampling_offsets", "attention_logits"))
    _check_tensor("reference_points", reference_points, "(B, Q, 1 or L, 4 or 2)")
    _check_like_value("reference_points", reference_points, value)
    batch, queries = sampling_offsets.shape[:2]
    levels = len(shapes)
    if (
        tuple(reference_points.shape[:2]) != (batch, queries)
        or reference_points.shape[2] not in (1, levels)
        or reference_points.shape[3] not in (2, 4)
    ):
        raise ValueError(
            f"reference_points must have shape (B, Q, 1 or L, 4) for boxes (cx, cy, w, h) or (B, Q, 1 or L, 2) "
            f"for points, with B={batch}, Q={queries}, L={levels}; got {tuple(reference_points.shape)}"
        )
    check_offset_scale(offset_scale)
    return shapes, points


def check_offset_scale(offset_scale) -> None:
    """Any finite real scalar: Python's, NumPy's (np.float32 too), not bool."""
    if isinstance(offset_scale, bool) or not isinstance(offset_scale, numbers.Real):
        raise TypeError(f"offset_scale must be a real number, got {type(offset_scale).__name__}")
    if not math.isfinite(offset_scale):
        raise ValueError(f"offset_scale must be finite, got {float(offset_scale)}")
