"""The RT-DETRv2 decoder: query selection from the encoder's memory, then layers of self-attention,
multi-scale deformable cross-attention (rtdetrv2_kernels) and an FFN, each refining the boxes."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

import rtdetrv2_kernels

from .config import RTDETRv2Config
from .denoising import contrastive_denoising_group
from .layers import MLP, ConvNormLayer, activation, cached_unless_compiling, inverse_sigmoid


class MSDeformableAttention(nn.Module):
    """Deformable cross-attention with per-level point counts, computed by rtdetrv2_kernels.

    With ``fused=True`` (the default) the softmax over each head's points and the sampling locations are
    computed inside the kernel (`ms_deform_attn_fused`); ``fused=False`` computes them here in PyTorch and
    calls the plain `ms_deform_attn` (the same results, to rounding).
    """

    def __init__(self, dim: int, heads: int, num_points: list[int], method: str = "default",
                 offset_scale: float = 0.5, backend: str | None = None, fused: bool = True):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.num_points = list(num_points)
        self.method, self.offset_scale = method, offset_scale
        self.backend, self.fused = backend, fused
        total = heads * sum(self.num_points)
        self.sampling_offsets = nn.Linear(dim, total * 2)
        self.attention_weights = nn.Linear(dim, total)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        # 1 / num_points of each point's level: the box-reference offset scale of the unfused path.
        scale = [1.0 / n for n in self.num_points for _ in range(n)]
        self.register_buffer("num_points_scale", torch.tensor(scale), persistent=False)
        self.reset_parameters()
        if method == "discrete":  # no gradient reaches the offsets through nearest-pixel sampling
            self.sampling_offsets.requires_grad_(False)

    def reset_parameters(self) -> None:
        """Offsets start on rays at evenly spread angles, one ray per head, point k of a level at radius k."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        rays = torch.stack([angles.cos(), angles.sin()], -1)
        rays = rays / rays.abs().max(-1, keepdim=True).values
        radii = torch.cat([torch.arange(1, n + 1, dtype=torch.float32) for n in self.num_points])
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((rays[:, None, :] * radii[None, :, None]).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, query, reference_points, value, spatial_shapes, value_mask=None):
        """query (B, Q, dim); reference_points (B, Q, 1, 4) boxes or (B, Q, 1, 2) points in [0, 1];
        value (B, S, dim); spatial_shapes: L (height, width) pairs; value_mask (B, S), True where valid."""
        batch, num_queries, _ = query.shape
        value = self.value_proj(value)
        if value_mask is not None:
            value = value * value_mask.to(value.dtype).unsqueeze(-1)
        value = value.reshape(batch, value.shape[1], self.heads, self.dim // self.heads)
        points = sum(self.num_points)
        offsets = self.sampling_offsets(query).reshape(batch, num_queries, self.heads, points, 2)
        logits = self.attention_weights(query).reshape(batch, num_queries, self.heads, points)
        if self.fused:
            output = rtdetrv2_kernels.ms_deform_attn_fused(
                value, spatial_shapes, reference_points, offsets, logits, self.num_points,
                offset_scale=self.offset_scale, method=self.method, backend=self.backend,
            )
        else:
            weights = logits.softmax(-1)
            if reference_points.shape[-1] == 4:
                scale = self.num_points_scale.to(query.dtype)[:, None] * self.offset_scale
                locations = reference_points[:, :, None, :, :2] + offsets * scale * reference_points[:, :, None, :, 2:]
            else:
                sizes = [[w, h] for (h, w), n in zip(spatial_shapes, self.num_points) for _ in range(n)]
                locations = reference_points[:, :, None] + offsets / query.new_tensor(sizes)
            output = rtdetrv2_kernels.ms_deform_attn(
                value, spatial_shapes, locations, weights, self.num_points, method=self.method, backend=self.backend
            )
        return self.output_proj(output)


class TransformerDecoderLayer(nn.Module):
    def __init__(self, config: RTDETRv2Config):
        super().__init__()
        dim = config.hidden_dim
        self.self_attn = nn.MultiheadAttention(dim, config.decoder_heads, config.dropout, batch_first=True)
        self.dropout1 = nn.Dropout(config.dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformableAttention(
            dim, config.decoder_heads, config.num_points, config.cross_attn_method, config.offset_scale,
            config.attention_backend, config.fused_attention,
        )
        self.dropout2 = nn.Dropout(config.dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, config.decoder_ffn_dim)
        self.activation = activation(config.decoder_activation)
        self.dropout3 = nn.Dropout(config.dropout)
        self.linear2 = nn.Linear(config.decoder_ffn_dim, dim)
        self.dropout4 = nn.Dropout(config.dropout)
        self.norm3 = nn.LayerNorm(dim)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, target, reference_points, memory, spatial_shapes, attn_mask=None, memory_mask=None,
                query_pos_embed=None):
        query = target + query_pos_embed
        attended = self.self_attn(query, query, value=target, attn_mask=attn_mask, need_weights=False)[0]
        target = self.norm1(target + self.dropout1(attended))
        attended = self.cross_attn(target + query_pos_embed, reference_points, memory, spatial_shapes, memory_mask)
        target = self.norm2(target + self.dropout2(attended))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(target))))
        return self.norm3(target + self.dropout4(ffn))


class TransformerDecoder(nn.Module):
    def __init__(self, config: RTDETRv2Config):
        super().__init__()
        self.layers = nn.ModuleList(TransformerDecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.eval_idx = config.eval_idx % config.num_decoder_layers

    def forward(self, target, ref_points_unact, memory, spatial_shapes, bbox_head, score_head, query_pos_head,
                attn_mask=None, memory_mask=None):
        """Boxes (cxcywh in [0, 1]) and logits per layer, stacked: every layer in training, only layer
        `eval_idx` otherwise (the layers after it are skipped)."""
        boxes, logits = [], []
        ref_points = ref_points_detached = torch.sigmoid(ref_points_unact)
        output = target
        for i, layer in enumerate(self.layers):
            output = layer(output, ref_points_detached.unsqueeze(2), memory, spatial_shapes, attn_mask, memory_mask,
                           query_pos_head(ref_points_detached))
            delta = bbox_head[i](output)
            refined = torch.sigmoid(delta + inverse_sigmoid(ref_points_detached))
            if self.training:
                logits.append(score_head[i](output))
                # Look-forward-twice: later layers' training boxes also carry the gradient of the previous box.
                boxes.append(refined if i == 0 else torch.sigmoid(delta + inverse_sigmoid(ref_points)))
            elif i == self.eval_idx:
                logits.append(score_head[i](output))
                boxes.append(refined)
                break
            ref_points = refined
            ref_points_detached = refined.detach()
        return torch.stack(boxes), torch.stack(logits)


class RTDETRTransformerv2(nn.Module):
    """Projects the encoder's maps (adding stride-2 levels up to `num_levels`), selects the top-scoring
    encoder positions as initial queries and boxes, and runs the decoder."""

    def __init__(self, config: RTDETRv2Config):
        super().__init__()
        dim = config.hidden_dim
        self.config = config
        self.num_levels = config.num_levels
        self.num_queries = config.num_queries
        self.num_classes = config.num_classes
        self.input_proj = nn.ModuleList(ConvNormLayer(ch, dim, 1) for ch in config.decoder_in_channels)
        ch = config.decoder_in_channels[-1]
        for _ in range(config.num_levels - len(config.decoder_in_channels)):
            self.input_proj.append(ConvNormLayer(ch, dim, 3, 2))
            ch = dim
        self.decoder = TransformerDecoder(config)
        if config.num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(config.num_classes + 1, dim, padding_idx=config.num_classes)
            nn.init.normal_(self.denoising_class_embed.weight[:-1])
        if config.learn_query_content:
            self.tgt_embed = nn.Embedding(config.num_queries, dim)
            nn.init.xavier_uniform_(self.tgt_embed.weight)
        self.query_pos_head = MLP(4, 2 * dim, dim, 2)
        self.enc_output = nn.Sequential(OrderedDict([("proj", nn.Linear(dim, dim)), ("norm", nn.LayerNorm(dim))]))
        agnostic = config.query_select_method == "agnostic"
        self.enc_score_head = nn.Linear(dim, 1 if agnostic else config.num_classes)
        self.enc_bbox_head = MLP(dim, dim, 4, 3)
        self.dec_score_head = nn.ModuleList(nn.Linear(dim, config.num_classes) for _ in range(config.num_decoder_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(dim, dim, 4, 3) for _ in range(config.num_decoder_layers))
        self._anchor_cache: dict = {}
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        prior = 0.01  # focal-loss prior: every class starts at probability 0.01
        bias = -math.log((1 - prior) / prior)
        nn.init.constant_(self.enc_score_head.bias, bias)
        for head in [self.enc_bbox_head, *self.dec_bbox_head]:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        for head in self.dec_score_head:
            nn.init.constant_(head.bias, bias)
        nn.init.xavier_uniform_(self.enc_output.proj.weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj.conv.weight)

    def _level_maps(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        maps = [proj(feature) for proj, feature in zip(self.input_proj, features)]
        for proj in self.input_proj[len(features):]:
            maps.append(proj(maps[-1] if len(maps) > len(features) else features[-1]))
        return maps

    def anchors(self, spatial_shapes, device, dtype, eps: float = 1e-2):
        """Per encoder position: a box anchor (inverse-sigmoid cxcywh: the pixel's center, size 0.05 * 2^level)
        and whether it lies safely inside the image; anchors outside get the dtype's largest value."""
        return cached_unless_compiling(self._anchor_cache, (tuple(spatial_shapes), device, dtype, eps),
                                       lambda: self._make_anchors(spatial_shapes, device, dtype, eps))

    @staticmethod
    def _make_anchors(spatial_shapes, device, dtype, eps):
        anchors = []
        for level, (height, width) in enumerate(spatial_shapes):
            y, x = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                                  torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
            centers = torch.stack([(x + 0.5) / width, (y + 0.5) / height], -1).reshape(-1, 2)
            sizes = torch.full_like(centers, 0.05 * 2.0**level)
            anchors.append(torch.cat([centers, sizes], -1))
        anchors = torch.cat(anchors)[None].to(dtype)
        valid = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
        anchors = torch.log(anchors / (1 - anchors))
        return torch.where(valid, anchors, torch.finfo(dtype).max), valid

    def _select_queries(self, scores):
        method = self.config.query_select_method
        if method == "one2many":
            return torch.topk(scores.flatten(1), self.num_queries, dim=-1).indices // self.num_classes
        ranking = scores.squeeze(-1) if method == "agnostic" else scores.max(-1).values
        return torch.topk(ranking, self.num_queries, dim=-1).indices

    def forward(self, features: list[torch.Tensor], targets: list[dict] | None = None) -> dict:
        maps = self._level_maps(features)
        spatial_shapes = [tuple(m.shape[-2:]) for m in maps]
        memory = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)

        denoising = None
        if self.training and self.config.num_denoising > 0 and targets is not None:
            denoising = contrastive_denoising_group(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                self.config.num_denoising, self.config.label_noise_ratio, self.config.box_noise_scale,
            )

        anchors, valid = self.anchors(spatial_shapes, memory.device, memory.dtype)
        output_memory = self.enc_output(valid.to(memory.dtype) * memory)
        enc_logits = self.enc_score_head(output_memory)
        enc_coords_unact = self.enc_bbox_head(output_memory) + anchors
        index = self._select_queries(enc_logits)

        def pick(tensor):
            return tensor.gather(1, index.unsqueeze(-1).expand(-1, -1, tensor.shape[-1]))

        topk_coords_unact = pick(enc_coords_unact)
        content = self.tgt_embed.weight.unsqueeze(0).expand(memory.shape[0], -1, -1) \
            if self.config.learn_query_content else pick(output_memory).detach()
        ref_points_unact = topk_coords_unact.detach()
        attn_mask = None
        if denoising is not None:
            content = torch.cat([denoising["content"], content], 1)
            ref_points_unact = torch.cat([denoising["boxes_unact"], ref_points_unact], 1)
            attn_mask = denoising["attn_mask"]

        boxes, logits = self.decoder(content, ref_points_unact, memory, spatial_shapes, self.dec_bbox_head,
                                     self.dec_score_head, self.query_pos_head, attn_mask=attn_mask)
        if denoising is not None:
            split = denoising["meta"]["dn_num_split"]
            dn_boxes, boxes = torch.split(boxes, split, dim=2)
            dn_logits, logits = torch.split(logits, split, dim=2)
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.training:  # the layout of the original training code's outputs, for its criterion
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
            out["enc_aux_outputs"] = [{"pred_logits": pick(enc_logits), "pred_boxes": torch.sigmoid(topk_coords_unact)}]
            out["enc_meta"] = {"class_agnostic": self.config.query_select_method == "agnostic"}
            if denoising is not None:
                out["dn_aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(dn_logits, dn_boxes)]
                out["dn_meta"] = denoising["meta"]
        return out
