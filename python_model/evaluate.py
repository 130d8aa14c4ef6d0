"""COCO box metrics of a model on a COCO-format dataset, with pycocotools (the reference implementation of
the COCO metrics, which the published RT-DETRv2 numbers are computed with).

    metrics = evaluate(model, CocoDetection(images_dir, instances_json, EvalTransforms(size)))
    metrics["AP50"]
"""

from __future__ import annotations

import contextlib
import io

import torch

from .data import CocoDetection, eval_collate
from .progress import Progress

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def detections(model, dataset: CocoDetection, batch_size: int = 8, device=None, progress: bool = True) -> list[dict]:
    """The model's detections on every image, in COCO's results format (bbox x, y, w, h in the original
    image's pixels, category ids of the dataset)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=eval_collate)
    results = []
    with Progress(len(loader), "eval", enabled=progress) as bar:
        for images, targets in loader:
            outputs = model(images.to(device))
            sizes = torch.stack([t["orig_size"] for t in targets])
            for target, found in zip(targets, model.postprocess(outputs, sizes)):
                boxes = found["boxes"].cpu()
                boxes[:, 2:] -= boxes[:, :2]
                for score, label, box in zip(found["scores"].tolist(), found["labels"].tolist(), boxes.tolist()):
                    results.append({"image_id": target["image_id"], "category_id": dataset.category_ids[label],
                                    "bbox": box, "score": score})
            bar.step(images.shape[0])
    model.train(was_training)
    return results


def coco_metrics(annotations_file: str, results: list[dict]) -> dict[str, float]:
    """AP (0.5:0.95), AP50, AP75 and AP for small, medium and large boxes, in [0, 1]; NaN where the
    ground truth has no box of that size (pycocotools' -1)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError("COCO evaluation needs pycocotools: pip install 'rtdetrv2-kernels[model]'") from error
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates every stage
        ground_truth = COCO(annotations_file)
        if not results:
            return dict.fromkeys(METRICS, 0.0)
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(value) if value >= 0 else float("nan") for name, value in zip(METRICS, evaluation.stats)}


def evaluate(model, dataset: CocoDetection, batch_size: int = 8, device=None, progress: bool = True) -> dict:
    return coco_metrics(dataset.annotations_file, detections(model, dataset, batch_size, device, progress))


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name} {100 * metrics[name]:.1f}" if metrics[name] == metrics[name] else f"{name} n/a"
                     for name in METRICS)
