"""Run lightly-train's LT-DETR models (RT-DETRv2 and D-FINE decoders) on rtdetrv2_kernels.ms_deform_attn.

    from rtdetrv2_kernels.integrations import lightly_train as rk_lightly_train
    rk_lightly_train.patch()           # every LT-DETR model, built before or after, uses the op
    rk_lightly_train.unpatch()         # exactly as before
    with rk_lightly_train.patched():
        model.predict(image)

Each ``MSDeformableAttention`` of ``lightly_train._task_models.object_detection_components.rtdetrv2_decoder``
and ``.dfine_decoder`` stores ``functools.partial(deformable_attention_core_func_v2, method=...)`` as
``self.ms_deformable_attn_core`` when it is built. A descriptor on those classes makes such a partial read as
the same partial of ``rtdetrv2_kernels.compat.deformable_attention_core_func_v2`` (the original's discrete
clamp and its lack of location gradients kept) for ``method="default"`` and ``"discrete"``. The ONNX export
path (``convert_to_onnx_export()`` rebinds the core with ``method="bilinear_gather"``) keeps lightly-train's
own function, so exports are written as lightly-train writes them. A core set otherwise stays.
"""

from __future__ import annotations

import functools

from .. import compat
from ._patching import InstanceAttributeSwap, Patches, import_or_explain

__all__ = ["patch", "unpatch", "patched", "is_patched", "patched_targets"]

_PACKAGE = "lightly_train._task_models.object_detection_components"
_DECODERS = ("rtdetrv2_decoder", "dfine_decoder")
_ATTRIBUTE = "ms_deformable_attn_core"
_CORE = "deformable_attention_core_func_v2"
_SERVED_METHODS = ("default", "discrete")


def _core_swap(original):
    def swap(instance, stored):
        if (isinstance(stored, functools.partial) and stored.func is original
                and stored.keywords.get("method", "default") in _SERVED_METHODS):
            return functools.partial(compat.deformable_attention_core_func_v2, *stored.args, **stored.keywords)
        return stored

    return InstanceAttributeSwap(_ATTRIBUTE, swap)


def _targets():
    for name in _DECODERS:
        module = import_or_explain(f"{_PACKAGE}.{name}", "lightly-train")
        cls = getattr(module, "MSDeformableAttention", None)
        original = getattr(module, _CORE, None)
        if cls is not None and callable(original):
            yield cls, _ATTRIBUTE, _core_swap(original), f"{module.__name__}.MSDeformableAttention.{_ATTRIBUTE}"


patch, unpatch, patched, is_patched, patched_targets = Patches(_targets).interface()
