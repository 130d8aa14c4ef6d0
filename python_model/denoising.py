"""Contrastive denoising queries for training (DINO-style, as RT-DETR trains): noised copies of the
ground-truth boxes and labels are decoded next to the regular queries, behind an attention mask."""

from __future__ import annotations

import torch

from .layers import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


def contrastive_denoising_group(targets, num_classes: int, num_queries: int, class_embed, num_denoising: int,
                                label_noise_ratio: float, box_noise_scale: float) -> dict | None:
    """targets: one dict per image with "labels" (N,) (or "class_labels") and "boxes" (N, 4) cxcywh in [0, 1].

    Each group holds every image's ground truths twice: a positive copy (noise inside half the box size) and
    a negative copy (noise between half and all of it). Returns None when no image has a ground truth, else
    the denoising queries' content (B, D, dim), inverse-sigmoid boxes (B, D, 4), the (D + num_queries)^2
    self-attention mask (True = blocked) and the metadata a matching criterion needs.
    """
    labels = [t["labels"] if "labels" in t else t["class_labels"] for t in targets]
    counts = [len(x) for x in labels]
    most = max(counts, default=0)
    if most == 0:
        return None
    groups = max(num_denoising // most, 1)
    batch = len(targets)
    device = labels[0].device

    query_labels = torch.full((batch, most), num_classes, dtype=torch.int64, device=device)
    query_boxes = torch.zeros(batch, most, 4, device=device)
    present = torch.zeros(batch, most, dtype=torch.bool, device=device)
    for i, (image_labels, target) in enumerate(zip(labels, targets)):
        query_labels[i, : counts[i]] = image_labels
        query_boxes[i, : counts[i]] = target["boxes"]
        present[i, : counts[i]] = True
    # Layout per image: [positives, negatives] repeated `groups` times.
    query_labels = query_labels.repeat(1, 2 * groups)
    query_boxes = query_boxes.repeat(1, 2 * groups, 1)
    present = present.repeat(1, 2 * groups)
    negative = torch.zeros(batch, 2 * most, 1, device=device)
    negative[:, most:] = 1
    negative = negative.repeat(1, groups, 1)
    # Each image's positive copies sit at g * 2 * most + j (group g, ground truth j): known from the counts
    # alone, so no data-dependent op (torch.nonzero) is needed and torch.compile keeps one graph.
    group_starts = torch.arange(groups, device=device)[:, None] * (2 * most)
    positive_index = [(group_starts + torch.arange(n, device=device)).flatten() for n in counts]
    total = 2 * most * groups

    if label_noise_ratio > 0:
        flip = torch.rand(query_labels.shape, device=device) < label_noise_ratio * 0.5
        random_labels = torch.randint_like(query_labels, 0, num_classes)
        query_labels = torch.where(flip & present, random_labels, query_labels)
    if box_noise_scale > 0:
        corners = box_cxcywh_to_xyxy(query_boxes)
        half_size = (query_boxes[..., 2:] * 0.5).repeat(1, 1, 2) * box_noise_scale
        sign = torch.randint_like(query_boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(query_boxes)
        magnitude = (magnitude + 1.0) * negative + magnitude * (1 - negative)
        corners = (corners + sign * magnitude * half_size).clamp(0.0, 1.0)
        query_boxes = box_xyxy_to_cxcywh(corners)
        query_boxes = torch.where(query_boxes < 0, -query_boxes, query_boxes)
    boxes_unact = inverse_sigmoid(query_boxes)

    size = total + num_queries
    attn_mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    attn_mask[total:, :total] = True  # regular queries never see the denoising ones
    for g in range(groups):  # each group sees only itself among the denoising queries
        start, end = 2 * most * g, 2 * most * (g + 1)
        attn_mask[start:end, :start] = True
        attn_mask[start:end, end:total] = True
    meta = {"dn_positive_idx": positive_index, "dn_num_group": groups, "dn_num_split": [total, num_queries]}
    return {"content": class_embed(query_labels), "boxes_unact": boxes_unact, "attn_mask": attn_mask, "meta": meta}
