"""The model's configuration and the presets of the published RT-DETRv2 models.

Field names follow the original RT-DETRv2 code (lyuwenyu/RT-DETR, rtdetrv2_pytorch) so that its YAML
settings read across directly; `from_transformers_config` reads a Hugging Face `config.json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .coco import COCO_LABELS

RESNET_DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
METHODS = ("default", "discrete")
QUERY_SELECT_METHODS = ("default", "one2many", "agnostic")
# The criterion's settings, named as in transformers' RTDetrV2Config (checkpoints.py carries them across).
CRITERION_FIELDS = ("matcher_class_cost", "matcher_bbox_cost", "matcher_giou_cost", "matcher_alpha", "matcher_gamma",
                    "focal_loss_alpha", "focal_loss_gamma", "weight_loss_vfl", "weight_loss_bbox", "weight_loss_giou")


@dataclass
class RTDETRv2Config:
    # Backbone: a ResNet-vd (deep stem, average-pool shortcuts) with frozen BatchNorm.
    backbone_block: str = "bottleneck"  # "basic" (ResNet-18/34) or "bottleneck" (ResNet-50/101)
    backbone_depths: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    backbone_stem_channels: int = 64
    backbone_channels: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])  # stage outputs
    backbone_return_idx: list[int] = field(default_factory=lambda: [1, 2, 3])
    # Bottleneck blocks only: stride the first 1x1 convolution instead of the 3x3 (transformers'
    # downsample_in_bottleneck; RT-DETRv2's published backbones stride the 3x3).
    backbone_stride_in_1x1: bool = False
    # Hybrid encoder: AIFI on `use_encoder_idx`, then top-down and bottom-up CSP fusion.
    feat_strides: list[int] = field(default_factory=lambda: [8, 16, 32])
    encoder_hidden_dim: int = 256
    use_encoder_idx: list[int] = field(default_factory=lambda: [2])
    num_encoder_layers: int = 1
    encoder_heads: int = 8
    encoder_ffn_dim: int = 1024
    encoder_activation: str = "gelu"
    normalize_before: bool = False
    expansion: float = 1.0
    depth_mult: float = 1.0
    activation: str = "silu"
    pe_temperature: float = 10000.0
    # Decoder.
    num_classes: int = 80
    hidden_dim: int = 256
    decoder_in_channels: list[int] = field(default_factory=lambda: [256, 256, 256])
    num_levels: int = 3
    num_points: list[int] = field(default_factory=lambda: [4, 4, 4])
    decoder_heads: int = 8
    num_decoder_layers: int = 6
    decoder_ffn_dim: int = 1024
    decoder_activation: str = "relu"
    num_queries: int = 300
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    learn_query_content: bool = False
    eval_idx: int = -1
    offset_scale: float = 0.5
    cross_attn_method: str = "default"  # "default" (bilinear) or "discrete" (nearest pixel)
    query_select_method: str = "default"
    dropout: float = 0.0
    # Training criterion (python_model.build_criterion): the original's HungarianMatcher costs and
    # RTDETRCriterionv2 weights, under transformers' names.
    matcher_class_cost: float = 2.0
    matcher_bbox_cost: float = 5.0
    matcher_giou_cost: float = 2.0
    matcher_alpha: float = 0.25
    matcher_gamma: float = 2.0
    focal_loss_alpha: float = 0.75  # of the varifocal loss
    focal_loss_gamma: float = 2.0
    weight_loss_vfl: float = 1.0
    weight_loss_bbox: float = 5.0
    weight_loss_giou: float = 2.0
    # Inference.
    num_top_queries: int | None = None  # detections kept per image before the threshold; None: num_queries
    eval_spatial_size: list[int] = field(default_factory=lambda: [640, 640])  # (height, width)
    labels: list[str] = field(default_factory=lambda: list(COCO_LABELS))
    # How the decoder's cross-attention runs: the op's backend (None: the fastest here) and whether the
    # softmax and the sampling locations are computed inside the kernel (rtdetrv2_kernels.ms_deform_attn_fused).
    attention_backend: str | None = None
    fused_attention: bool = True

    def __post_init__(self):
        if isinstance(self.num_points, int):
            self.num_points = [self.num_points] * self.num_levels
        self.num_points = [int(n) for n in self.num_points]
        self.validate()

    def validate(self) -> None:
        def check(condition, message):
            if not condition:
                raise ValueError(f"RTDETRv2Config: {message}")

        check(self.backbone_block in ("basic", "bottleneck"),
              f"backbone_block must be 'basic' or 'bottleneck', got {self.backbone_block!r}")
        check(len(self.backbone_depths) == len(self.backbone_channels),
              "backbone_depths and backbone_channels must have one entry per stage")
        check(len(self.feat_strides) == len(self.backbone_return_idx),
              "feat_strides needs one stride per returned backbone stage")
        check(len(self.decoder_in_channels) == len(self.backbone_return_idx),
              "decoder_in_channels needs one entry per encoder output level")
        check(self.num_levels >= len(self.decoder_in_channels),
              f"num_levels ({self.num_levels}) must be at least the number of encoder levels "
              f"({len(self.decoder_in_channels)}); extra levels are made by stride-2 convolutions")
        check(len(self.num_points) == self.num_levels and all(n > 0 for n in self.num_points),
              f"num_points must hold {self.num_levels} positive counts (one per level), got {self.num_points}")
        check(self.cross_attn_method in METHODS, f"cross_attn_method must be one of {METHODS}")
        check(self.query_select_method in QUERY_SELECT_METHODS,
              f"query_select_method must be one of {QUERY_SELECT_METHODS}")
        check(self.hidden_dim % self.decoder_heads == 0, "hidden_dim must be divisible by decoder_heads")
        check(self.encoder_hidden_dim % self.encoder_heads == 0,
              "encoder_hidden_dim must be divisible by encoder_heads")
        check(self.encoder_hidden_dim % 4 == 0, "encoder_hidden_dim must be divisible by 4 (2-D sin-cos embedding)")
        check(-self.num_decoder_layers <= self.eval_idx < self.num_decoder_layers,
              f"eval_idx must index one of the {self.num_decoder_layers} decoder layers")
        check(len(self.labels) == self.num_classes,
              f"labels has {len(self.labels)} names for {self.num_classes} classes")

    @property
    def encoder_in_channels(self) -> list[int]:
        return [self.backbone_channels[i] for i in self.backbone_return_idx]

    def replace(self, **changes) -> "RTDETRv2Config":
        if "num_classes" in changes and "labels" not in changes and changes["num_classes"] != self.num_classes:
            changes["labels"] = [f"class_{i}" for i in range(changes["num_classes"])]
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RTDETRv2Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"RTDETRv2Config: unknown fields {unknown}")
        return cls(**values)


def _resnet(depth: int) -> dict:
    basic = depth < 50
    widths = [64, 128, 256, 512] if basic else [256, 512, 1024, 2048]
    return dict(backbone_block="basic" if basic else "bottleneck", backbone_depths=RESNET_DEPTHS[depth],
                backbone_channels=widths)


_SMALL_ENCODER = dict(expansion=0.5)

# The published models (rtdetrv2_pytorch/configs/rtdetrv2): r18vd/r34vd (120 epochs), r50vd_m, r50vd,
# r101vd; the reduced-point r18vd_sp1/sp2/sp3; the discrete-sampling *_dsp variants.
PRESETS: dict[str, dict] = {
    "r18vd": dict(**_resnet(18), **_SMALL_ENCODER, num_decoder_layers=3),
    "r34vd": dict(**_resnet(34), **_SMALL_ENCODER, num_decoder_layers=4),
    "r50vd_m": dict(**_resnet(50), **_SMALL_ENCODER, eval_idx=2),
    "r50vd": dict(**_resnet(50)),
    "r101vd": dict(**_resnet(101), encoder_hidden_dim=384, encoder_ffn_dim=2048, decoder_in_channels=[384] * 3),
}
for _points in (1, 2, 3):
    PRESETS[f"r18vd_sp{_points}"] = dict(PRESETS["r18vd"], num_points=[_points] * 3)
for _name in ("r18vd", "r34vd", "r50vd_m", "r50vd"):
    PRESETS[f"{_name}_dsp"] = dict(PRESETS[_name], cross_attn_method="discrete")


def preset(name: str, **overrides) -> RTDETRv2Config:
    """The configuration of a published model, e.g. ``preset("r18vd")``, with optional changes such as
    ``num_points=[3, 6, 3]`` or ``cross_attn_method="discrete"``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return RTDETRv2Config(**{**PRESETS[name], **overrides})
