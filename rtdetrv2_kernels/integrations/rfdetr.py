"""Run Roboflow's RF-DETR (and its LW-DETR decoder) on rtdetrv2_kernels.ms_deform_attn.

    from rtdetrv2_kernels.integrations import rfdetr as rk_rfdetr
    rk_rfdetr.patch()                  # every RF-DETR model, built before or after, uses the op
    rk_rfdetr.unpatch()                # exactly as before
    with rk_rfdetr.patched():
        detections = model.predict(image)

``rfdetr.models.ops.modules.ms_deform_attn.MSDeformAttn.forward`` calls the name ``ms_deform_attn_core_pytorch``
that its module imported (grid_sample per level, a corner gather on MPS and XLA); that module attribute is
replaced. Its layout: value (B, H, C, S), locations (B, Q, H, L, P, 2) in eager mode and (B, Q, H, L*P, 2) in
its export mode, weights (B, Q, H, L*P); the host-side shapes list it passes spares a device sync. As in the
original, no dtype is cast and the output is (B, Q, H*C).
"""

from __future__ import annotations

import rtdetrv2_kernels as _package  # the op is looked up per call, so a test can watch it

from .. import compat
from .._validation import level_shapes
from ._patching import Patches, import_or_explain

__all__ = ["patch", "unpatch", "patched", "is_patched", "patched_targets", "ms_deform_attn_core"]

_MODULE = "rfdetr.models.ops.modules.ms_deform_attn"
_NAME = "ms_deform_attn_core_pytorch"


def ms_deform_attn_core(value, value_spatial_shapes, sampling_locations, attention_weights,
                        value_spatial_shapes_hw=None):
    """RF-DETR's ``ms_deform_attn_core_pytorch`` on the op: value (B, H, C, S); value_spatial_shapes an (L, 2)
    tensor, or value_spatial_shapes_hw L (height, width) pairs of ints (used when given); locations
    (B, Q, H, L, P, 2) or (B, Q, H, L*P, 2); weights (B, Q, H, L*P). Returns (B, Q, H*C)."""
    shapes = level_shapes(value_spatial_shapes if value_spatial_shapes_hw is None else value_spatial_shapes_hw)
    sampling_locations, points = compat.flat_points(sampling_locations, len(shapes))
    # (B, H, C, S) -> (B, S, H, C): a view; the kernels copy it once to make channels contiguous.
    return _package.ms_deform_attn(value.permute(0, 3, 1, 2), shapes, sampling_locations, attention_weights, points)


def _targets():
    module = import_or_explain(_MODULE, "rfdetr")
    if callable(getattr(module, _NAME, None)):
        yield module, _NAME, ms_deform_attn_core, f"{_MODULE}.{_NAME}"


patch, unpatch, patched, is_patched, patched_targets = Patches(_targets).interface()
