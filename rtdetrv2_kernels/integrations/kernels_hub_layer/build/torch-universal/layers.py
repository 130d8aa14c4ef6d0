"""The layer `kernels.kernelize` binds to transformers' MultiScaleDeformableAttention modules. `kernels` allows
a layer class no members but forward, can_torch_compile and has_backward: the work is the package's."""

from torch import nn

from rtdetrv2_kernels.integrations.transformers import multi_scale_deformable_attention_layer_forward


class MultiScaleDeformableAttention(nn.Module):
    can_torch_compile = True  # torch.compile(fullgraph=True) traces the op
    has_backward = True

    forward = multi_scale_deformable_attention_layer_forward
