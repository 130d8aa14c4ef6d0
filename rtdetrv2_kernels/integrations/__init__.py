"""Integrations with other codebases (docs/integrations.md). Each submodule imports its library only when used
and has the same interface (patch, unpatch, patched, is_patched, patched_targets): ``transformers`` (Hugging
Face, 15 model families, kernelized layers included), ``ultralytics`` (RT-DETR), ``rfdetr`` (RF-DETR),
``lightly_train`` (LT-DETR) and ``libreyolo`` (its kernel slot); ``kernels_hub`` is this package as a Hugging
Face ``kernels`` layer."""
