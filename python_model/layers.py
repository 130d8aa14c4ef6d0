"""Building blocks shared by the backbone, the encoder and the decoder."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, None: nn.Identity}


def activation(name: str | None) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(k for k in ACTIVATIONS if k)}")
    return ACTIVATIONS[name]()


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (buffers, not parameters), as the backbone of
    every published RT-DETRv2 model is fine-tuned."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]


class ConvNormLayer(nn.Module):
    """conv (no bias) -> norm -> activation; 'same' padding for odd kernels."""

    def __init__(self, ch_in, ch_out, kernel_size, stride=1, padding=None, act=None, norm=nn.BatchNorm2d):
        super().__init__()
        padding = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=padding, bias=False)
        self.norm = norm(ch_out)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))

    @torch.no_grad()
    def fold_norm(self) -> None:
        """Inference only: the norm's fixed affine map (frozen, or BatchNorm's running statistics) moves into
        the convolution's weight and bias, saving a pass over the activations."""
        if isinstance(self.norm, nn.Identity):
            return
        norm, conv = self.norm, self.conv
        scale = (norm.running_var.double() + norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        shift = -norm.running_mean.double() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.double()
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
        folded.weight.copy_(conv.weight.double() * scale[:, None, None, None])
        folded.bias.copy_(shift)
        self.conv, self.norm = folded, nn.Identity()


class MLP(nn.Module):
    """Linear layers with ReLU between them (the box, query-position and proposal heads)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def cached_unless_compiling(cache: dict, key, make):
    """make(), memoized in `cache` under `key` when running eagerly. While torch.compile or torch.export traces,
    make() runs inside the graph instead: a lookup in the dict would make the graph guard on its contents."""
    if torch.compiler.is_compiling():
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    center, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat([center - 0.5 * size, center + 0.5 * size], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    low, high = boxes[..., :2], boxes[..., 2:]
    return torch.cat([(low + high) / 2, high - low], dim=-1)
