"""RT-DETRv2: backbone -> hybrid encoder -> decoder, with pre- and post-processing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import PResNet
from .checkpoints import load_state_dict_strictly, read_original_checkpoint, read_pretrained, read_transformers_checkpoint
from .config import RTDETRv2Config, preset
from .decoder import MSDeformableAttention, RTDETRTransformerv2
from .encoder import HybridEncoder, RepVggBlock
from .layers import ConvNormLayer, box_cxcywh_to_xyxy


class RTDETRv2(nn.Module):
    """The detector. ``forward(images)`` takes (B, 3, H, W) RGB in [0, 1] (H and W multiples of 32; the
    published models use 640x640) and returns ``{"pred_logits": (B, num_queries, num_classes),
    "pred_boxes": (B, num_queries, 4)}`` (boxes cxcywh, normalized); in training mode, with ``targets``, also
    the auxiliary and denoising outputs in the original training code's layout."""

    def __init__(self, config: RTDETRv2Config):
        super().__init__()
        self.config = config
        self.backbone = PResNet(config.backbone_block, config.backbone_depths, config.backbone_channels,
                                config.backbone_stem_channels, config.backbone_return_idx,
                                config.backbone_stride_in_1x1)
        self.encoder = HybridEncoder(config)
        self.decoder = RTDETRTransformerv2(config)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RTDETRv2":
        """A randomly initialized model of a published configuration (see python_model.config.PRESETS)."""
        return cls(preset(name, **overrides))

    @classmethod
    def from_pretrained(cls, name_or_path: str, preset: str | None = None, **overrides) -> "RTDETRv2":
        """Weights from a Hugging Face model directory or Hub id (e.g. "PekingU/rtdetr_v2_r18vd"), or an
        original training checkpoint (.pth; then pass ``preset=``). See python_model/checkpoints.py."""
        return cls.from_state_dict(*read_pretrained(name_or_path, preset, **overrides), source=name_or_path)

    @classmethod
    def from_state_dict(cls, config: RTDETRv2Config, state: dict, source: str = "checkpoint") -> "RTDETRv2":
        """A model of `config` holding exactly `state` (every key present, no other, same shapes), in eval mode."""
        model = cls(config)
        load_state_dict_strictly(model, state, source)
        return model.eval()

    def set_attention(self, backend: str | None = None, fused: bool | None = None) -> "RTDETRv2":
        """Chooses how the decoder's deformable attention runs: the rtdetrv2_kernels backend (None: the
        fastest for the tensors' device) and whether softmax and locations are fused into the kernel."""
        for module in self.modules():
            if isinstance(module, MSDeformableAttention):
                module.backend = backend
                if fused is not None:
                    module.fused = fused
        self.config.attention_backend = backend
        if fused is not None:
            self.config.fused_attention = fused
        return self

    @torch.no_grad()
    def deploy(self) -> "RTDETRv2":
        """Inference only, irreversibly: every norm's fixed affine map folded into its convolution and each
        RepVGG block's two branches merged into one 3x3 convolution (the same outputs to rounding, fewer
        passes over memory and fewer launches). Load weights before deploying; a deployed model cannot train."""
        self.eval()
        for module in self.modules():
            if isinstance(module, RepVggBlock):
                module.merge_branches()
            elif isinstance(module, ConvNormLayer):
                module.fold_norm()
        self.deployed = True
        return self

    def train(self, mode: bool = True) -> "RTDETRv2":
        if mode and getattr(self, "deployed", False):
            raise RuntimeError("this model was deployed (norms folded into convolutions); load it again to train")
        return super().train(mode)

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None) -> dict:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        return self.decoder(self.encoder(self.backbone(images)), targets)

    def top_detections(self, outputs: dict, image_sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batched core of postprocess, in tensor operations only (an exported graph holds it):
        (scores (B, K), labels (B, K), boxes (B, K, 4) xyxy in pixels) of the K = `num_top_queries` (default:
        as many as queries) best (query, class) pairs by sigmoid score, best first; image_sizes (B, 2) holds
        each original image's (height, width)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        sizes = image_sizes.to(dtype=boxes.dtype, device=boxes.device).reshape(-1, 2)
        scale = sizes.flip(-1).repeat(1, 2)[:, None, :]  # (w, h, w, h)
        boxes = box_cxcywh_to_xyxy(boxes) * scale
        num_classes = logits.shape[-1]
        top = min(self.config.num_top_queries or logits.shape[1], logits.shape[1] * num_classes)
        scores, index = torch.topk(torch.sigmoid(logits).flatten(1), top, dim=-1)
        labels = index % num_classes
        boxes = boxes.gather(1, (index // num_classes).unsqueeze(-1).expand(-1, -1, 4))
        return scores, labels, boxes

    @torch.no_grad()
    def postprocess(self, outputs: dict, image_sizes, threshold: float | None = None) -> list[dict]:
        """Per image: the `num_top_queries` (default: as many as queries) best (query, class) pairs by sigmoid
        score (no NMS), as
        {"scores": (K,), "labels": (K,), "boxes": (K, 4) xyxy in pixels of the original image}.
        image_sizes: (B, 2) (height, width) of the original images; threshold drops lower scores."""
        sizes = torch.as_tensor(image_sizes).reshape(-1, 2)
        if sizes.shape[0] != outputs["pred_logits"].shape[0]:
            raise ValueError(f"image_sizes has {sizes.shape[0]} entries for a batch of {outputs['pred_logits'].shape[0]}")
        results = []
        for image_scores, image_labels, image_boxes in zip(*self.top_detections(outputs, sizes)):
            keep = image_scores > threshold if threshold is not None else slice(None)
            results.append({"scores": image_scores[keep], "labels": image_labels[keep], "boxes": image_boxes[keep]})
        return results

    @torch.no_grad()
    def predict(self, images, threshold: float = 0.5) -> list[dict]:
        """Detections for PIL images or (3, H, W) uint8 tensors: preprocess, forward, postprocess."""
        pixels, sizes = preprocess(images, self.config.eval_spatial_size)
        parameter = next(self.parameters())
        outputs = self(pixels.to(device=parameter.device, dtype=parameter.dtype))
        return self.postprocess(outputs, sizes, threshold)


def load_transformers_model(directory: str, **overrides) -> RTDETRv2:
    """A model from a directory written by transformers' save_pretrained; `overrides` change configuration
    fields that do not affect the weights (attention_backend, fused_attention, num_top_queries, ...)."""
    return RTDETRv2.from_state_dict(*read_transformers_checkpoint(directory, **overrides), source=directory)


def load_original_checkpoint(path: str, config: RTDETRv2Config | str | None = None, **overrides) -> RTDETRv2:
    """A model from an original training checkpoint; `config` is an RTDETRv2Config or a preset name ("r18vd",
    "r50vd_m_dsp", ...), since the original's checkpoints do not record the architecture (python_model's
    trainer's do, and need none)."""
    return RTDETRv2.from_state_dict(*read_original_checkpoint(path, config, **overrides), source=path)


def load_pretrained(name_or_path: str, preset: str | None = None, **overrides) -> RTDETRv2:
    """RTDETRv2.from_pretrained: a transformers directory or Hub id, or an original .pth with `preset`."""
    return RTDETRv2.from_pretrained(name_or_path, preset, **overrides)


def preprocess(images, size: Sequence[int] = (640, 640)) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to `size` (height, width) with bilinear filtering, scale to [0, 1], no mean/std (as the
    published models were trained). Takes a PIL image, a (3, H, W) uint8 tensor, or a list of them;
    returns the (B, 3, height, width) float32 batch and the original (height, width) of each image."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    height, width = size
    batch, sizes = [], []
    for image in images:
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
                raise ValueError(f"a tensor image must be (3, H, W) uint8, got {tuple(image.shape)} {image.dtype}")
            sizes.append(image.shape[1:])
            pixels = image[None].float()
            pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
            batch.append(pixels[0].clamp(0, 255) / 255.0)
        else:  # PIL
            sizes.append((image.height, image.width))
            from PIL import Image

            resized = image.convert("RGB").resize((width, height), Image.BILINEAR)
            pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8)
            batch.append(pixels.reshape(height, width, 3).permute(2, 0, 1).float() / 255.0)
    return torch.stack(batch), torch.tensor([list(s) for s in sizes])
