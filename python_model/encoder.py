"""The hybrid encoder: attention-based intra-scale interaction (AIFI) on the coarsest level, then CNN-based
cross-scale fusion (CCFM): a top-down pass and a bottom-up pass of CSP blocks built from RepVGG blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import RTDETRv2Config
from .layers import ConvNormLayer, activation, cached_unless_compiling


def sincos_position_embedding(height: int, width: int, dim: int, temperature: float, device, dtype) -> torch.Tensor:
    """(1, height*width, dim) 2-D sin-cos embedding, rows in row-major pixel order, laid out as
    [sin(y w), cos(y w), sin(x w), cos(x w)] over dim/4 frequencies w (as Hugging Face transformers; on
    square maps this equals the original code's, which orders the grid column-major)."""
    frequencies = temperature ** -(torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim // 4))
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64, device=device),
                          torch.arange(width, dtype=torch.float64, device=device), indexing="ij")
    y = y.reshape(-1, 1) * frequencies
    x = x.reshape(-1, 1) * frequencies
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).to(dtype)[None]


class RepVggBlock(nn.Module):
    """3x3 and 1x1 conv branches summed (mergeable into one 3x3 conv for deployment)."""

    def __init__(self, channels: int, act: str):
        super().__init__()
        self.conv1 = ConvNormLayer(channels, channels, 3, 1, padding=1)
        self.conv2 = ConvNormLayer(channels, channels, 1, 1, padding=0)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv2 is None:  # merged by merge_branches
            return self.act(self.conv1(x))
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def merge_branches(self) -> None:
        """Inference only: both branches' norms folded, then the 1x1 kernel added into the 3x3 kernel's center."""
        if self.conv2 is None:
            return
        self.conv1.fold_norm()
        self.conv2.fold_norm()
        self.conv1.conv.weight += F.pad(self.conv2.conv.weight, [1, 1, 1, 1])
        self.conv1.conv.bias += self.conv2.conv.bias
        self.conv2 = None


class CSPRepLayer(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, num_blocks: int, expansion: float, act: str):
        super().__init__()
        hidden = int(ch_out * expansion)
        self.conv1 = ConvNormLayer(ch_in, hidden, 1, 1, act=act)
        self.conv2 = ConvNormLayer(ch_in, hidden, 1, 1, act=act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, act) for _ in range(num_blocks)])
        self.conv3 = ConvNormLayer(hidden, ch_out, 1, 1, act=act) if hidden != ch_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class TransformerEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, act: str, normalize_before: bool):
        super().__init__()
        self.normalize_before = normalize_before
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation(act)

    def forward(self, src: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        residual = src
        if self.normalize_before:
            src = self.norm1(src)
        query = src + pos_embed
        src = residual + self.dropout1(self.self_attn(query, query, value=src, need_weights=False)[0])
        if not self.normalize_before:
            src = self.norm1(src)
        residual = src
        if self.normalize_before:
            src = self.norm2(src)
        src = residual + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(src)))))
        if not self.normalize_before:
            src = self.norm2(src)
        return src


class TransformerEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_args):
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(**layer_args) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos_embed)
        return src


class HybridEncoder(nn.Module):
    def __init__(self, config: RTDETRv2Config):
        super().__init__()
        dim = config.encoder_hidden_dim
        self.hidden_dim = dim
        self.use_encoder_idx = list(config.use_encoder_idx)
        self.pe_temperature = config.pe_temperature
        self.input_proj = nn.ModuleList(ConvNormLayer(ch, dim, 1) for ch in config.encoder_in_channels)
        layer_args = dict(dim=dim, heads=config.encoder_heads, ffn_dim=config.encoder_ffn_dim,
                          dropout=config.dropout, act=config.encoder_activation,
                          normalize_before=config.normalize_before)
        self.encoder = nn.ModuleList(
            TransformerEncoder(config.num_encoder_layers, **layer_args) for _ in self.use_encoder_idx
        )
        num_fusions = len(config.encoder_in_channels) - 1
        blocks = round(3 * config.depth_mult)
        self.lateral_convs = nn.ModuleList(ConvNormLayer(dim, dim, 1, 1, act=config.activation) for _ in range(num_fusions))
        self.fpn_blocks = nn.ModuleList(
            CSPRepLayer(2 * dim, dim, blocks, config.expansion, config.activation) for _ in range(num_fusions)
        )
        self.downsample_convs = nn.ModuleList(ConvNormLayer(dim, dim, 3, 2, act=config.activation) for _ in range(num_fusions))
        self.pan_blocks = nn.ModuleList(
            CSPRepLayer(2 * dim, dim, blocks, config.expansion, config.activation) for _ in range(num_fusions)
        )
        self._pos_embed_cache: dict = {}

    def position_embedding(self, height: int, width: int, device, dtype) -> torch.Tensor:
        return cached_unless_compiling(
            self._pos_embed_cache, (height, width, device, dtype),
            lambda: sincos_position_embedding(height, width, self.hidden_dim, self.pe_temperature, device, dtype),
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.input_proj):
            raise ValueError(f"HybridEncoder expects {len(self.input_proj)} feature maps, got {len(features)}")
        maps = [proj(feature) for proj, feature in zip(self.input_proj, features)]
        for encoder, index in zip(self.encoder, self.use_encoder_idx):
            batch, _, height, width = maps[index].shape
            tokens = maps[index].flatten(2).transpose(1, 2)
            pos_embed = self.position_embedding(height, width, tokens.device, tokens.dtype)
            tokens = encoder(tokens, pos_embed)
            maps[index] = tokens.transpose(1, 2).reshape(batch, self.hidden_dim, height, width)

        # Top-down: from the coarsest map, upsample and fuse with each finer one.
        top_down = [maps[-1]]
        for i, (lateral, block) in enumerate(zip(self.lateral_convs, self.fpn_blocks)):
            coarse = lateral(top_down[0])
            top_down[0] = coarse
            fine = maps[len(maps) - 2 - i]
            top_down.insert(0, block(torch.cat([F.interpolate(coarse, scale_factor=2.0, mode="nearest"), fine], 1)))
        # Bottom-up: from the finest result, downsample and fuse with each coarser one.
        outputs = [top_down[0]]
        for i, (downsample, block) in enumerate(zip(self.downsample_convs, self.pan_blocks)):
            outputs.append(block(torch.cat([downsample(outputs[-1]), top_down[i + 1]], 1)))
        return outputs
