"""Other implementations timed beside ours when they are installed, behind our op's call signature.

- ``transformers``: Hugging Face transformers' ``multi_scale_deformable_attention_v2`` (RT-DETRv2's
  pure-PyTorch op; any points per level, both methods).
- ``torch-ms-deform-attn``: the fused CPU/CUDA kernels on PyPI (Deformable-DETR layout: bilinear only, the
  same number of points on every level).
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Callable

import torch

from .requirements import missing

TRANSFORMERS = "transformers"
TORCH_MS_DEFORM_ATTN = "torch-ms-deform-attn"
NAMES = (TRANSFORMERS, TORCH_MS_DEFORM_ATTN)
# bench.sh builds torch-ms-deform-attn from its sdist; it can fail to build (it is then left out).
_MODULES = {TRANSFORMERS: ("transformers", None),
            TORCH_MS_DEFORM_ATTN: ("torch_ms_deform_attn", "pip install --no-build-isolation torch-ms-deform-attn")}


def _transformers_v2():
    try:
        from transformers.models.rt_detr_v2.modeling_rt_detr_v2 import multi_scale_deformable_attention_v2
    except ImportError:
        return None
    return multi_scale_deformable_attention_v2


def _torch_ms_deform_attn():
    try:
        from torch_ms_deform_attn import ms_deform_attn
    except ImportError:
        return None

    @functools.lru_cache
    def level_tensors(shapes: tuple, device: torch.device):  # made once: a host-to-device copy is a sync
        shapes = torch.tensor(shapes, dtype=torch.long, device=device)
        return shapes, torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])

    def call(value, shapes, locations, weights, points, method):
        levels, per_level = len(shapes), points[0]
        shapes, starts = level_tensors(tuple(map(tuple, shapes)), value.device)
        # Our (.., sum(P), ..) point layout is its (.., L, P, ..) one, flattened.
        return ms_deform_attn(value, shapes, starts, locations.unflatten(3, (levels, per_level)),
                              weights.unflatten(3, (levels, per_level)))

    return call


def for_problem(points, method: str) -> dict[str, Callable]:
    """The installed peers that handle this problem, as fn(value, shapes, locations, weights, points, method)."""
    found = {}
    if (hf := _transformers_v2()) is not None:
        found[TRANSFORMERS] = hf
    if method == "default" and len(set(points)) == 1 and (fused := _torch_ms_deform_attn()) is not None:
        found[TORCH_MS_DEFORM_ATTN] = fused
    return found


def unavailable() -> dict[str, str]:
    """The peers that cannot run here, each with why."""
    reasons = {}
    for name, (module, hint) in _MODULES.items():
        reason = missing([module], hint) if hint else missing([module])
        if reason is None and name == TRANSFORMERS and _transformers_v2() is None:
            reason = "this transformers has no multi_scale_deformable_attention_v2 (RT-DETRv2 needs transformers>=4.47)"
        if reason is not None:
            reasons[name] = reason
    return reasons


def versions() -> dict[str, str]:
    found = {}
    for name in NAMES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
