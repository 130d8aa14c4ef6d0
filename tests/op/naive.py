"""A deliberately naive fp64 implementation of the contract in docs/semantics.md, written from the text and
independently of the package (no grid_sample, no gather): one Python loop iteration per sample. It exists
to check the vectorized reference, so keep it obvious rather than fast."""

from __future__ import annotations

import math

import torch


def _pixel_value(value_level, b, h, width, height, x, y):
    """value at integer pixel (x, y) of one level, or zeros outside it."""
    if 0 <= x < width and 0 <= y < height:
        return value_level[b, y * width + x, h]
    return torch.zeros_like(value_level[b, 0, h])


def naive_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights, num_points, method):
    value = value.double()
    sampling_locations = sampling_locations.double()
    attention_weights = attention_weights.double()
    batch, _, heads, channels = value.shape
    queries = sampling_locations.shape[1]
    starts = [0]
    for height, width in spatial_shapes:
        starts.append(starts[-1] + height * width)
    rows = []
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                total = torch.zeros(channels, dtype=torch.float64)
                point = 0
                for level, (height, width) in enumerate(spatial_shapes):
                    value_level = value[:, starts[level] : starts[level + 1]]
                    for _ in range(num_points[level]):
                        loc_x, loc_y = sampling_locations[b, q, h, point]
                        weight = attention_weights[b, q, h, point]
                        point += 1
                        if method == "default":
                            sample = _bilinear(value_level, b, h, width, height, loc_x, loc_y)
                        else:
                            sample = _nearest(value_level, b, h, width, height, loc_x, loc_y)
                        total = total + weight * sample
                rows.append(total)
    return torch.stack(rows).view(batch, queries, heads * channels)


def _bilinear(value_level, b, h, width, height, loc_x, loc_y):
    x = loc_x * width - 0.5  # pixel centers at (i + 0.5) / size
    y = loc_y * height - 0.5
    if not (-1 <= x.item() < width and -1 <= y.item() < height):  # no corner inside (NaN included)
        return torch.zeros_like(value_level[b, 0, h])
    x0 = math.floor(x.item())
    y0 = math.floor(y.item())
    fx = x - x0  # keeps the autograd link to the location
    fy = y - y0
    sample = 0
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
        sample = sample + weight * _pixel_value(value_level, b, h, width, height, x0 + dx, y0 + dy)
    return sample


def _nearest(value_level, b, h, width, height, loc_x, loc_y):
    if math.isnan(loc_x.item()) or math.isnan(loc_y.item()):
        return torch.zeros_like(value_level[b, 0, h])
    x = _nearest_index(loc_x.item(), width)
    y = _nearest_index(loc_y.item(), height)
    # The pixel is piecewise constant in the location: a zero (not a missing) gradient.
    return _pixel_value(value_level, b, h, width, height, x, y) + 0 * torch.nan_to_num(loc_x + loc_y)


def _nearest_index(loc, size):
    t = min(max(loc * size + 0.5, 0.0), float(size))  # bounded first: floor(inf) is an error in Python
    return min(math.floor(t), size - 1)
