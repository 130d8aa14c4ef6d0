"""A Hugging Face `kernels` layer repository for MultiScaleDeformableAttention, served by the installed
rtdetrv2_kernels (see rtdetrv2_kernels.integrations.kernels_hub): torch-universal, since the op picks its
backend per device itself."""

from . import layers

__all__ = ["layers"]
