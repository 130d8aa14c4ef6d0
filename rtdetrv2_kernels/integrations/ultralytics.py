"""Run ultralytics' RT-DETR models on rtdetrv2_kernels.ms_deform_attn.

    from rtdetrv2_kernels.integrations import ultralytics as rk_ultralytics
    rk_ultralytics.patch()             # every RT-DETR model, built before or after, uses the op
    rk_ultralytics.unpatch()           # exactly as before
    with rk_ultralytics.patched():
        results = model(images)

``ultralytics.nn.modules.transformer.MSDeformAttn.forward`` calls the name
``multi_scale_deformable_attn_pytorch`` that its module imported from ``ultralytics.nn.modules.utils``
(grid_sample per level); that module attribute is replaced, so the module looks the op up per call. Both
location layouts are served: (B, Q, H, L, P, 2) with weights (B, Q, H, L, P) up to ultralytics 8.4.56, and
(B, Q, H, L*P, 2) with weights (B, Q, H, L*P) from 8.4.57 (equal points per level either way). As in the
original, no dtype is cast (mixed dtypes raise outside autocast) and the output is (B, Q, H*C). Exporting
(``model.export(format="onnx")``) writes the op as ONNX operators (docs/integrations.md, "Deployment").
"""

from __future__ import annotations

import rtdetrv2_kernels as _package  # the op is looked up per call, so a test can watch it

from .. import compat
from .._validation import level_shapes
from ._patching import Patches, import_or_explain

__all__ = ["patch", "unpatch", "patched", "is_patched", "patched_targets", "multi_scale_deformable_attn"]

_MODULE = "ultralytics.nn.modules.transformer"
_NAME = "multi_scale_deformable_attn_pytorch"


def multi_scale_deformable_attn(value, value_spatial_shapes, sampling_locations, attention_weights):
    """ultralytics' ``multi_scale_deformable_attn_pytorch`` on the op: value (B, S, H, C), value_spatial_shapes
    L (height, width) pairs (or an (L, 2) tensor), locations (B, Q, H, L, P, 2) or (B, Q, H, L*P, 2), weights
    (B, Q, H, L, P) or (B, Q, H, L*P); returns (B, Q, H*C)."""
    shapes = level_shapes(value_spatial_shapes)
    sampling_locations, points = compat.flat_points(sampling_locations, len(shapes))
    if attention_weights.dim() == 5:
        attention_weights = attention_weights.flatten(3, 4)
    return _package.ms_deform_attn(value, shapes, sampling_locations, attention_weights, points)


def _targets():
    module = import_or_explain(_MODULE, "ultralytics")
    if callable(getattr(module, _NAME, None)):
        yield module, _NAME, multi_scale_deformable_attn, f"{_MODULE}.{_NAME}"


patch, unpatch, patched, is_patched, patched_targets = Patches(_targets).interface()
