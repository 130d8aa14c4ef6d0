"""Serve libreyolo's ``ms_deform_attn`` kernel slot with rtdetrv2_kernels.ms_deform_attn, on every device.

    from rtdetrv2_kernels.integrations import libreyolo as rk_libreyolo
    rk_libreyolo.patch()               # registered as the slot's newest provider, CPU included
    rk_libreyolo.unpatch()             # unregistered, and libreyolo's functions back
    with rk_libreyolo.patched():
        results = model(image)

libreyolo's RT-DETR, RT-DETRv2, D-FINE, DEIM, DEIMv2, RF-DETR, LW-DETR and Deformable DETR models ask
``libreyolo.kernels`` for an ``ms_deform_attn`` provider and fall back to grid_sample without one (its own
providers need CUDA). patch() registers this package's op as the newest provider, under the name
``"rtdetrv2_kernels"`` (so ``LIBREYOLO_KERNELS=rtdetrv2_kernels`` selects it, and ``=off`` still forces the
portable path). The slot takes the same point count on every level; for the RT-DETRv2-style cores,
whose point counts may differ per level (D-FINE, DEIM and DEIMv2 use [3, 6, 3] or [4, 2]) and which
libreyolo then always sends to grid_sample, ``maybe_ms_deform_attn_v2`` is replaced where those models look it
up: when this provider is the one the slot would use, it runs any point counts on the op, else it does
what libreyolo's does. As in libreyolo, tracing, torch.compile and export keep libreyolo's portable path,
and discrete sampling never reaches the slot.
"""

from __future__ import annotations

import importlib
import weakref

import torch

from .. import compat
from ._patching import Patches, import_or_explain

__all__ = ["patch", "unpatch", "patched", "is_patched", "patched_targets", "PROVIDER_NAME", "ms_deform_attn_slot"]

PROVIDER_NAME = "rtdetrv2_kernels"
_SLOT = "ms_deform_attn"
_SLOT_MODULE = "libreyolo.kernels.attention.ms_deform_attn"
_V2_ADAPTER = "maybe_ms_deform_attn_v2"
# The modules whose attention cores call the v2 adapter by the name they imported.
_V2_CALLERS = ("libreyolo.models.rtdetrv2.utils", "libreyolo.models.dfine.ms_deform", "libreyolo.models.deim.ms_deform",
               "libreyolo.models.ec.utils", "libreyolo.models.openvocab.ovdeim.decoder")


# libreyolo keeps one int64 level table per shape set on each device (an lru_cache), passed to every call: its
# values are read once (one host-device sync on a GPU) and kept here while that tensor lives and is unchanged.
# Keyed by id (a tensor's == is elementwise), the entry dropped when the tensor is freed.
_host_shapes: dict[int, tuple] = {}


def _level_shapes(spatial_shapes) -> list:
    if not isinstance(spatial_shapes, torch.Tensor):
        return spatial_shapes
    key = id(spatial_shapes)
    entry = _host_shapes.get(key)
    if entry is None or entry[0]() is not spatial_shapes or entry[1] != spatial_shapes._version:
        reference = weakref.ref(spatial_shapes, lambda _, key=key: _host_shapes.pop(key, None))
        entry = (reference, spatial_shapes._version, [tuple(pair) for pair in spatial_shapes.tolist()])
        _host_shapes[key] = entry
    return entry[2]


def ms_deform_attn_slot(value, spatial_shapes, sampling_locations, attention_weights):
    """The slot's convention: value (B, S, H, C), spatial_shapes an (L, 2) int64 tensor (or pairs), locations
    (B, Q, H, L, P, 2), weights (B, Q, H, L, P); returns (B, Q, H*C)."""
    return compat.deformable_attention_core_func(value, _level_shapes(spatial_shapes), sampling_locations,
                                                 attention_weights)


def _ragged_v2(original, kernels, slot_module):
    def maybe_ms_deform_attn_v2(value, spatial_shapes, sampling_locations, attention_weights, num_points_list):
        chosen = slot_module.ms_deform_attn_available(value) and next(kernels.iter_impls(_SLOT), (None,))[0]
        if chosen != PROVIDER_NAME or len(num_points_list) != len(spatial_shapes):
            return original(value, spatial_shapes, sampling_locations, attention_weights, num_points_list)
        return compat.deformable_attention_core_func_v2(value, _level_shapes(spatial_shapes), sampling_locations,
                                                        attention_weights, list(num_points_list))

    return maybe_ms_deform_attn_v2


def _register(kernels):
    def register():
        kernels.register(_SLOT, ms_deform_attn_slot, name=PROVIDER_NAME)
        kernels.clear_cache()  # resolve() caches per forced setting; register only drops one key

        def unregister():
            kernels.unregister(_SLOT, PROVIDER_NAME)
            kernels.clear_cache()

        return unregister

    return register


def _targets():
    kernels = import_or_explain("libreyolo.kernels", "libreyolo")
    # Importing it registers libreyolo's own providers first, so that this one goes on top of them.
    slot_module = import_or_explain(_SLOT_MODULE, "libreyolo")
    yield None, _SLOT, _register(kernels), f"libreyolo.kernels: {_SLOT} provider {PROVIDER_NAME!r}"
    original = getattr(slot_module, _V2_ADAPTER)
    replacement = _ragged_v2(original, kernels, slot_module)
    for name in (_SLOT_MODULE, *_V2_CALLERS):
        try:
            module = importlib.import_module(name)
        except ImportError:  # a model family this libreyolo does not have
            continue
        if getattr(module, _V2_ADAPTER, None) is original:
            yield module, _V2_ADAPTER, replacement, f"{name}.{_V2_ADAPTER}"


patch, unpatch, patched, is_patched, patched_targets = Patches(_targets).interface()
