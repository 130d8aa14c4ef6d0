"""Run Hugging Face transformers' deformable-attention models on rtdetrv2_kernels.ms_deform_attn.

    from rtdetrv2_kernels.integrations import transformers as rk_transformers
    rk_transformers.patch()            # every supported model, built before or after, uses the op
    rk_transformers.unpatch()          # exactly as before
    with rk_transformers.patched():    # or for a block only
        outputs = model(pixel_values)

How each family calls its attention core in transformers 5.x, and what is swapped:

- RT-DETRv2: ``modeling_rt_detr_v2.multi_scale_deformable_attention_v2``, a module function looked up per
  call: the function is replaced.
- D-FINE, DEIMv2: each attention module stores that function as ``self.ms_deformable_attn_core`` when it is
  built. A descriptor on the class makes instances that hold transformers' function
  (built before or while patched) call the op instead; an instance given another core keeps it.
- Deformable DETR, RT-DETR (v1), Grounding DINO, MM Grounding DINO, OmDet-Turbo, LW-DETR, RF-DETR and
  PP-DocLayout v2-v4: a ``MultiScaleDeformableAttention`` layer (Deformable DETR's layout): its class's
  ``forward`` is replaced, also on layers that ``kernels.kernelize`` gave a hub kernel's forward (what
  ``from_pretrained`` does on CUDA in transformers >= 5.25); unpatch() gives them that kernel back.
- Mask2Former, OneFormer: the module function ``multi_scale_deformable_attention`` is replaced.

A family missing from the installed transformers is skipped. patch() is idempotent and unpatch() restores
every attribute it changed; neither is thread-safe (do not patch while another thread runs a model).
"""

from __future__ import annotations

import importlib
from types import MethodType

import rtdetrv2_kernels as _package  # the op is looked up per call, so a test can watch it

from .. import compat
from ._patching import InstanceAttributeSwap, Patches

__all__ = ["patch", "unpatch", "patched", "is_patched", "patched_targets"]

_V2_CORE_CLASSES = (("d_fine", "DFineMultiscaleDeformableAttention"), ("deimv2", "Deimv2MultiscaleDeformableAttention"))
_V2_CORE_ATTRIBUTE = "ms_deformable_attn_core"
_LAYER_MODULES = ("deformable_detr", "rt_detr", "grounding_dino", "mm_grounding_dino", "omdet_turbo", "lw_detr",
                  "rf_detr", "pp_doclayout_v2", "pp_doclayout_v3", "pp_doclayout_v4")

# ----------------------------------------------------------------------------------------------------------
# The replacements: transformers' calling conventions on the op.
# ----------------------------------------------------------------------------------------------------------


def multi_scale_deformable_attention_v2(value, value_spatial_shapes, sampling_locations, attention_weights,
                                        num_points_list, method="default"):
    """transformers' RT-DETRv2 / D-FINE core: locations (B, Q, H, P, 2) with per-level point counts."""
    if method == "discrete":
        # transformers rounds the locations to integers, which passes them no gradient; the op's zeros would
        # reach the offset layers and let AdamW's weight decay move parameters it never touched before.
        sampling_locations = sampling_locations.detach()
    return _package.ms_deform_attn(value, value_spatial_shapes, sampling_locations, attention_weights,
                                   num_points_list, method)


def multi_scale_deformable_attention(value, value_spatial_shapes, sampling_locations, attention_weights):
    """transformers' Mask2Former / OneFormer core: locations (B, Q, H, L, P, 2), weights (B, Q, H, L, P)."""
    return compat.deformable_attention_core_func(value, value_spatial_shapes, sampling_locations, attention_weights)


def multi_scale_deformable_attention_layer_forward(self, value, value_spatial_shapes, value_spatial_shapes_list,
                                                   level_start_index, sampling_locations, attention_weights,
                                                   im2col_step):
    """``MultiScaleDeformableAttention.forward`` of transformers' Deformable-DETR-style models on the op (also
    the kernels hub layer's forward, integrations/kernels_hub.py)."""
    # transformers builds level_start_index as the running sum of the level sizes (levels in order), and its
    # own forward ignores it too; the host-side shapes list spares a device sync.
    return multi_scale_deformable_attention(value, value_spatial_shapes_list, sampling_locations, attention_weights)


def _core_swap(original, replacement):
    """Reads of ``ms_deformable_attn_core``: an instance holding transformers' own function gets the
    replacement; any other core it was given stays."""
    return InstanceAttributeSwap(_V2_CORE_ATTRIBUTE, lambda instance, stored: replacement if stored is original else stored)


def _forward_swap():
    """``MultiScaleDeformableAttention.forward``: the replacement, also for an instance whose ``forward``
    ``kernels.kernelize`` replaced (it binds the hub layer's forward in the instance's __dict__, which a plain
    class attribute would not outrank); an instance-level forward set otherwise stays."""

    def ours(instance):
        return MethodType(multi_scale_deformable_attention_layer_forward, instance)

    def swap(instance, stored):
        return ours(instance) if "_kernel_repo" in instance.__dict__ else stored

    return InstanceAttributeSwap("forward", swap, missing=ours, on_class=multi_scale_deformable_attention_layer_forward)


# ----------------------------------------------------------------------------------------------------------
# Patching.
# ----------------------------------------------------------------------------------------------------------


def _module(family: str):
    try:
        return importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ImportError:
        return None


# (families, module-level function name, replacement): functions their modeling files look up per call.
_FUNCTION_SWAPS = (
    (("rt_detr_v2",), "multi_scale_deformable_attention_v2", multi_scale_deformable_attention_v2),
    (("mask2former", "oneformer"), "multi_scale_deformable_attention", multi_scale_deformable_attention),
)


def _targets():
    """(owner, attribute, replacement, description) for every swap the installed transformers supports."""
    for families, name, replacement in _FUNCTION_SWAPS:
        for family in families:
            module = _module(family)
            if module is not None and callable(getattr(module, name, None)):
                yield module, name, replacement, f"{module.__name__}.{name}"
    for family, class_name in _V2_CORE_CLASSES:
        module = _module(family)
        cls = getattr(module, class_name, None)
        original = getattr(module, "multi_scale_deformable_attention_v2", None)
        if cls is not None and callable(original):
            yield (cls, _V2_CORE_ATTRIBUTE, _core_swap(original, multi_scale_deformable_attention_v2),
                   f"{module.__name__}.{class_name}.{_V2_CORE_ATTRIBUTE}")
    for family in _LAYER_MODULES:
        module = _module(family)
        cls = getattr(module, "MultiScaleDeformableAttention", None)
        if cls is not None and "forward" in cls.__dict__:
            yield cls, "forward", _forward_swap(), f"{module.__name__}.MultiScaleDeformableAttention.forward"


patch, unpatch, patched, is_patched, patched_targets = Patches(_targets).interface()
