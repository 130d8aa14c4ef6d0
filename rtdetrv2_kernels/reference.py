"""Pure-PyTorch multi-scale deformable attention: the "torch" backend and the oracle of every test.

Runs on any device and dtype PyTorch supports and is differentiable by autograd. It computes in fp32 for
fp16/bf16 inputs (fp64 for fp64) and returns value's dtype, as every kernel of this package does.
Inputs are assumed validated (see ``rtdetrv2_kernels.ms_deform_attn``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_reference", "ms_deform_attn_fused_reference", "fused_prologue_reference"]


def _bilinear(value_level: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """(N, C, H_l, W_l) sampled at (N, Q, p, 2) normalized locations -> (N, C, Q, p)."""
    # Locations far outside the level read nothing; clamping them (and NaN) to a point that is still
    # outside keeps grid_sample's float-to-int conversion defined without changing any value or gradient.
    locations = torch.nan_to_num(locations, nan=-1.0, posinf=2.0, neginf=-1.0).clamp(-1.0, 2.0)
    return F.grid_sample(value_level, 2 * locations - 1, mode="bilinear", padding_mode="zeros", align_corners=False)


def _bilinear_by_gather(value_level: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """_bilinear as index arithmetic and gathers of the four corners: the same values and first derivatives
    (one-sided at whole pixels, as grid_sample), and differentiable twice on every torch (grid_sample's
    own double backward is missing in torch 2.11, present in 2.14)."""
    n, channels, height, width = value_level.shape
    _, queries, points, _ = locations.shape
    locations = torch.nan_to_num(locations, nan=-1.0, posinf=2.0, neginf=-1.0).clamp(-1.0, 2.0)
    x = locations[..., 0] * width - 0.5
    y = locations[..., 1] * height - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    # Corners and indices in integers: an exported graph run in reduced precision (OpenVINO's CPU plugin
    # computes float math in bf16 by default) would otherwise round an index past the level's end.
    x0, y0 = x0.long(), y0.long()  # |x0| <= 2 * width after the clamp above: exact
    # Rows of C channels, one per (image-head, pixel): each corner is one Gather of Q*p rows (an index per
    # row, not per channel as gathering along the pixel axis of (N, C, hw) would need).
    rows = value_level.flatten(2).transpose(1, 2).reshape(n * height * width, channels)
    first_row = (torch.arange(n, device=value_level.device) * (height * width)).view(n, 1, 1)
    sampled = 0
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        cx, cy = x0 + dx, y0 + dy
        inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
        weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy) * inside
        index = first_row + cy.clamp(0, height - 1) * width + cx.clamp(0, width - 1)
        sampled = sampled + rows[index.reshape(-1)].view(n, queries, points, channels) * weight[..., None]
    return sampled.permute(0, 3, 1, 2)


def _nearest(value_level: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """(N, C, H_l, W_l) read at the nearest pixel of (N, Q, p, 2) locations, per axis clamped -> (N, C, Q, p)."""
    n, channels, height, width = value_level.shape
    _, queries, points, _ = locations.shape
    sizes = locations.new_tensor([width, height])
    pixel = torch.floor(locations * sizes + 0.5)
    readable = ~pixel.isnan().any(dim=-1)  # a NaN coordinate reads nothing
    pixel = torch.minimum(torch.nan_to_num(pixel, nan=0.0).clamp(min=0.0), sizes - 1)  # finite: castable
    # Clamped again as integers, for runtimes that run the float math in reduced precision (see above).
    index = pixel.long()
    column, row = index[..., 0].clamp(0, width - 1), index[..., 1].clamp(0, height - 1)
    index = (row * width + column).reshape(n, 1, queries * points)
    sampled = value_level.reshape(n, channels, height * width).gather(2, index.expand(n, channels, -1))
    # The pixel does not move with small changes of the location: its gradient is zero, not absent. Routing
    # the (finite) pixel through the result gives the locations a zero gradient, as the kernels do, so the
    # layers that produce them stay in the autograd graph.
    presence = (pixel.sum(-1) * 0 + 1) * readable
    return sampled.view(n, channels, queries, points) * presence[:, None]


def levels_in_order(value: torch.Tensor, shapes, starts: list[int]) -> torch.Tensor:
    """value with level l's rows moved to the cumulative position the op expects, from starts on the host.
    In order (the usual case) this is value itself, or a view of its first sum(H_l * W_l) rows: no copy."""
    sizes = [h * w for h, w in shapes]
    rows = value.shape[1]
    for level, (start, size) in enumerate(zip(starts, sizes)):
        if start < 0 or start + size > rows:
            raise ValueError(
                f"level_start_index[{level}] = {start} puts level {level} ({size} rows) outside value's "
                f"{rows} rows"
            )
    cumulative = [sum(sizes[:level]) for level in range(len(sizes))]
    if starts == cumulative:
        return value if rows == sum(sizes) else value.narrow(1, 0, sum(sizes))
    # One copy of value; slicing (rather than index_select) keeps the backward deterministic.
    return torch.cat([value.narrow(1, start, size) for start, size in zip(starts, sizes)], dim=1)


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points: Sequence[int],
    method: str = "default",
    *,
    bilinear: str = "grid_sample",
) -> torch.Tensor:
    """value (B, S, H, C), sampling_locations (B, Q, H, P, 2), attention_weights (B, Q, H, P) -> (B, Q, H*C).
    bilinear: "grid_sample", or "gather" (corner gathers: the same result, differentiable twice on every
    torch)."""
    batch, _, heads, channels = value.shape
    queries, total_points = sampling_locations.shape[1], sampling_locations.shape[3]
    out_dtype = value.dtype
    compute_dtype = torch.promote_types(value.dtype, torch.float32)
    value = value.to(compute_dtype)
    sampling_locations = sampling_locations.to(compute_dtype)
    attention_weights = attention_weights.to(compute_dtype)

    if bilinear not in ("grid_sample", "gather"):
        raise ValueError(f"bilinear must be 'grid_sample' or 'gather', got {bilinear!r}")
    sample = _nearest if method == "discrete" else _bilinear if bilinear == "grid_sample" else _bilinear_by_gather
    value_levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    location_levels = sampling_locations.split(list(num_points), dim=3)
    sampled = []
    for (height, width), value_level, locations in zip(spatial_shapes, value_levels, location_levels):
        # (B, h*w, H, C) -> (B*H, C, h, w);  (B, Q, H, p, 2) -> (B*H, Q, p, 2)
        value_level = value_level.permute(0, 2, 3, 1).reshape(batch * heads, channels, height, width)
        locations = locations.transpose(1, 2).reshape(batch * heads, queries, locations.shape[3], 2)
        sampled.append(sample(value_level, locations))
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, total_points)
    output = (torch.cat(sampled, dim=-1) * weights).sum(-1)  # (B*H, C, Q)
    return output.view(batch, heads * channels, queries).transpose(1, 2).contiguous().to(out_dtype)


def fused_prologue_reference(
    spatial_shapes: Sequence[tuple[int, int]],
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
    num_points: Sequence[int],
    offset_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of the plain op from those of the fused one: (sampling_locations, attention_weights).

    reference_points (B, Q, 1 or L, 4) boxes (cx, cy, w, h): loc = ref_xy + offset / n_l * ref_wh * offset_scale;
    (B, Q, 1 or L, 2) points: loc = ref_xy + offset / (W_l, H_l). attention_weights = softmax of each head's
    P logits. Computed in fp32 for fp16/bf16 inputs and returned in the offsets' dtype.
    """
    dtype = sampling_offsets.dtype
    compute_dtype = torch.promote_types(dtype, torch.float32)
    device = sampling_offsets.device

    def per_point(per_level) -> torch.Tensor:  # (P,): each point takes its level's entry; filled on device
        return torch.cat([torch.full((n,), x, dtype=compute_dtype, device=device)
                          for x, n in zip(per_level, num_points)])

    reference = reference_points.to(compute_dtype)
    if reference.shape[2] > 1:  # one reference per level: (B, Q, L, k) -> (B, Q, P, k)
        reference = reference[:, :, per_point(range(len(num_points))).long()]
    reference = reference.unsqueeze(2)  # (B, Q, 1, 1 or P, k), broadcast over heads (and points)
    offsets = sampling_offsets.to(compute_dtype)
    if reference.shape[-1] == 4:
        scale = per_point([offset_scale / n for n in num_points])[:, None]
        locations = reference[..., :2] + offsets * scale * reference[..., 2:]
    else:
        normalizer = torch.stack([per_point([w for _, w in spatial_shapes]), per_point([h for h, _ in spatial_shapes])], -1)
        locations = reference + offsets / normalizer
    weights = attention_logits.to(compute_dtype).softmax(-1)
    return locations.to(dtype), weights.to(dtype)


def ms_deform_attn_fused_reference(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
    num_points: Sequence[int],
    offset_scale: float = 0.5,
    method: str = "default",
    *,
    bilinear: str = "grid_sample",
) -> torch.Tensor:
    """The fused op (see ``rtdetrv2_kernels.ms_deform_attn_fused``) as its prologue then the plain op."""
    discrete = method == "discrete"
    locations, weights = fused_prologue_reference(
        spatial_shapes, reference_points.detach() if discrete else reference_points,
        sampling_offsets.detach() if discrete else sampling_offsets, attention_logits, num_points, offset_scale
    )
    if discrete and torch.is_grad_enabled() and not torch.onnx.is_in_onnx_export():
        # The nearest pixel does not move with small changes of the offsets and references: their gradient is
        # exactly zero, as the kernels give, also where the chain rule through the locations would multiply
        # zero by an infinite or NaN offset or box size. torch.where passes zeros without multiplying; it
        # keeps the layers that produce them in the autograd graph (DDP expects every parameter used).
        for tensor in (reference_points, sampling_offsets):
            locations = locations + torch.where(torch.zeros_like(tensor, dtype=torch.bool), tensor, 0).sum().to(
                locations.dtype)
    return ms_deform_attn_reference(value, spatial_shapes, locations, weights, num_points, method, bilinear=bilinear)
