"""RT-DETRv2's training criterion: Hungarian matching, then varifocal loss (classification, with the IoU of
each matched box as its target score) and L1 and GIoU box losses, over the final decoder layer, every
auxiliary layer, the encoder's proposals and the denoising groups (matched by construction).

    criterion = build_criterion(model.config)
    losses = criterion(model(images, targets), targets)   # model.train(); losses["loss"] is the total

Terms are named as transformers' RTDetrV2ForObjectDetection names them in its loss_dict and weighted as
there; docs/python_model.md lists where the original RTDETRCriterionv2 differs and which one this follows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import RTDETRv2Config
from .layers import box_cxcywh_to_xyxy


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU and union area of corner-format boxes: (N, M) each."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    overlap = (torch.min(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, None, :2], boxes2[:, :2]))
    overlap = overlap.clamp(min=0).prod(-1)
    union = area1[:, None] + area2 - overlap
    return overlap / union, union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU of corner-format boxes, (N, M)."""
    iou, union = box_iou(boxes1, boxes2)
    hull = (torch.max(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, None, :2], boxes2[:, :2]))
    hull = hull.clamp(min=0).prod(-1)
    return iou - (hull - union) / hull


def normalize_targets(targets, num_classes: int) -> list[dict]:
    """Each target as {"labels": (N,) int64, "boxes": (N, 4)} (transformers' "class_labels" accepted), with
    errors that name the image and the field."""
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets must be a list with one dict per image, got {type(targets).__name__}")
    normalized = []
    for i, target in enumerate(targets):
        labels = target.get("labels", target.get("class_labels"))
        boxes = target.get("boxes")
        if labels is None or boxes is None:
            raise ValueError(f"targets[{i}] needs 'labels' (or 'class_labels') and 'boxes', got {sorted(target)}")
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"targets[{i}]['labels'] must be a 1-D integer tensor, got {tuple(labels.shape)} "
                             f"{labels.dtype}")
        if boxes.shape != (len(labels), 4) or not boxes.is_floating_point():
            raise ValueError(f"targets[{i}]['boxes'] must be a ({len(labels)}, 4) float tensor (cx, cy, w, h, "
                             f"normalized), got {tuple(boxes.shape)} {boxes.dtype}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"targets[{i}]['labels'] must lie in [0, {num_classes}), got {labels.tolist()}")
        normalized.append({"labels": labels.long(), "boxes": boxes})
    return normalized


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to ground truths per image, minimizing
    class_cost * focal class cost + bbox_cost * L1 + giou_cost * (-GIoU) (scipy's linear_sum_assignment)."""

    def __init__(self, class_cost: float = 2.0, bbox_cost: float = 5.0, giou_cost: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.class_cost, self.bbox_cost, self.giou_cost = class_cost, bbox_cost, giou_cost
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: (prediction indices, ground-truth indices), int64 on the CPU."""
        from scipy.optimize import linear_sum_assignment

        probabilities = outputs["pred_logits"].float().sigmoid()
        indices = []
        for image_probabilities, image_boxes, target in zip(probabilities, outputs["pred_boxes"].float(), targets):
            p = image_probabilities[:, target["labels"]]
            negative = (1 - self.alpha) * p**self.gamma * -(1 - p + 1e-8).log()
            positive = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
            boxes = target["boxes"].to(image_boxes)
            cost = (self.bbox_cost * torch.cdist(image_boxes, boxes, p=1) + self.class_cost * (positive - negative)
                    - self.giou_cost * generalized_box_iou(box_cxcywh_to_xyxy(image_boxes), box_cxcywh_to_xyxy(boxes)))
            # A non-finite cost (a diverged prediction) is matched only when nothing else can be.
            largest = torch.finfo(cost.dtype).max
            cost = torch.nan_to_num(cost, nan=largest, posinf=largest, neginf=largest).cpu()
            rows, columns = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(columns, dtype=torch.int64)))
        return indices


class RTDETRCriterion(nn.Module):
    """The losses of one training step as a dict: each weighted term (loss_vfl, loss_bbox, loss_giou; with
    _aux_{i} for the auxiliary layers and then the encoder proposals, _dn_{i} for the denoising groups of
    layer i) and "loss", their sum."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weights: dict[str, float],
                 alpha: float = 0.75, gamma: float = 2.0):
        super().__init__()
        if set(weights) != {"loss_vfl", "loss_bbox", "loss_giou"}:
            raise ValueError(f"weights must give loss_vfl, loss_bbox and loss_giou, got {sorted(weights)}")
        self.num_classes, self.matcher, self.weights = num_classes, matcher, dict(weights)
        self.alpha, self.gamma = alpha, gamma

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        if "aux_outputs" not in outputs:
            raise ValueError("outputs lack 'aux_outputs': pass the outputs of model.train()(images, targets)")
        targets = normalize_targets(targets, self.num_classes)
        num_boxes = self._mean_boxes_per_process(targets, outputs["pred_logits"].device)
        final = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
        losses = self._terms(final, targets, self.matcher(final, targets), num_boxes, "")
        layers = list(outputs["aux_outputs"])
        for i, layer in enumerate(layers):
            losses.update(self._terms(layer, targets, self.matcher(layer, targets), num_boxes, f"_aux_{i}"))
        encoder_targets = targets
        if outputs.get("enc_meta", {}).get("class_agnostic"):  # one score per proposal: every box is class 0
            encoder_targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
        for j, proposals in enumerate(outputs.get("enc_aux_outputs", [])):
            indices = self.matcher(proposals, encoder_targets)
            losses.update(self._terms(proposals, encoder_targets, indices, num_boxes, f"_aux_{len(layers) + j}"))
        if "dn_aux_outputs" in outputs:
            meta = outputs["dn_meta"]
            # The positive copy of ground truth j in group g is query g * 2 * most + j (denoising.py).
            indices = [(positions.cpu(), torch.arange(len(t["labels"])).repeat(meta["dn_num_group"]))
                       for positions, t in zip(meta["dn_positive_idx"], targets)]
            for i, layer in enumerate(outputs["dn_aux_outputs"]):
                losses.update(self._terms(layer, targets, indices, num_boxes * meta["dn_num_group"], f"_dn_{i}"))
        losses["loss"] = sum(losses.values())
        return losses

    @staticmethod
    def _mean_boxes_per_process(targets: list[dict], device) -> float:
        """The normalizer: ground-truth boxes per image batch, averaged over processes when training is
        distributed (as the original does, so every process weighs a box the same), and at least 1."""
        count = float(sum(len(t["labels"]) for t in targets))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            total = torch.tensor([count], device=device)
            torch.distributed.all_reduce(total)
            count = total.item() / torch.distributed.get_world_size()
        return max(count, 1.0)

    def _terms(self, outputs, targets, indices, num_boxes, suffix) -> dict[str, torch.Tensor]:
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        batch = torch.cat([torch.full_like(rows, i) for i, (rows, _) in enumerate(indices)]).to(logits.device)
        rows = torch.cat([rows for rows, _ in indices]).to(logits.device)
        matched = boxes[batch, rows]
        matched_targets = torch.cat([t["boxes"][columns.to(t["boxes"].device)] for t, (_, columns)
                                     in zip(targets, indices)]).to(matched)
        matched_labels = torch.cat([t["labels"][columns.to(t["labels"].device)] for t, (_, columns)
                                    in zip(targets, indices)]).to(logits.device)
        corners, target_corners = box_cxcywh_to_xyxy(matched), box_cxcywh_to_xyxy(matched_targets)

        # Varifocal loss: a matched query's target score for its class is the IoU of its box.
        iou = box_iou(corners.detach(), target_corners)[0].diagonal()
        num_classes = logits.shape[-1]  # 1 for class-agnostic proposals
        classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device)
        classes[batch, rows] = matched_labels
        one_hot = F.one_hot(classes, num_classes + 1)[..., :-1].to(logits)
        scores = torch.zeros(logits.shape[:2], device=logits.device, dtype=logits.dtype)
        scores[batch, rows] = iou
        target_score = scores[..., None] * one_hot
        weight = self.alpha * logits.detach().sigmoid() ** self.gamma * (1 - one_hot) + target_score
        vfl = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
        terms = {
            "loss_vfl": vfl.mean(1).sum() * logits.shape[1] / num_boxes,
            "loss_bbox": F.l1_loss(matched, matched_targets, reduction="sum") / num_boxes,
            "loss_giou": (1 - generalized_box_iou(corners, target_corners).diagonal()).sum() / num_boxes,
        }
        return {name + suffix: value * self.weights[name] for name, value in terms.items()}


def build_criterion(config: RTDETRv2Config) -> RTDETRCriterion:
    """The criterion with the configuration's matcher costs and loss weights (the published ones by default)."""
    matcher = HungarianMatcher(config.matcher_class_cost, config.matcher_bbox_cost, config.matcher_giou_cost,
                               config.matcher_alpha, config.matcher_gamma)
    weights = {"loss_vfl": config.weight_loss_vfl, "loss_bbox": config.weight_loss_bbox,
               "loss_giou": config.weight_loss_giou}
    return RTDETRCriterion(config.num_classes, matcher, weights, config.focal_loss_alpha, config.focal_loss_gamma)
