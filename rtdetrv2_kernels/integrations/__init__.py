"""Integrations with other libraries. Each submodule imports its library only when used:
``rtdetrv2_kernels.integrations.transformers`` runs Hugging Face transformers' deformable attention models on
this package's op (docs/integrations.md)."""
