"""COCO-format detection data for training and evaluating python_model: the dataset, the original training
pipeline's augmentations (with the paper's dynamic augmentation: the strong ones stop at `stop_epoch`) and
the multi-scale batch collate.

    train_set = CocoDetection("data/train", "data/train/instances.json", TrainTransforms(stop_epoch=117))
    loader = DataLoader(train_set, batch_size=16, shuffle=True, collate_fn=MultiScaleCollate(stop_epoch=117))
    for epoch in range(epochs):
        train_set.set_epoch(epoch); loader.collate_fn.set_epoch(epoch)
        for images, targets in loader: ...

Images are (3, H, W) tensors; a target holds "boxes" (xyxy pixels while transforming; (N, 4) cxcywh
normalized to the image after the last transform, as the model and its criterion take them), "labels" (N,)
(0-based, in the order of the sorted category ids), "image_id" and "orig_size" (height, width).
The augmentations are written here from the descriptions of torchvision's v2 transforms that the original
pipeline uses (docs/python_model.md), with the same parameters; torchvision is not needed.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings

import torch
import torch.nn.functional as F

# RT-DETR's multi-scale training sizes (640 three times: it is drawn most often).
TRAIN_SCALES = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format dataset: `annotations` is an instances JSON (images, annotations, categories) whose
    image file names are relative to `images_dir`.

    As the original: crowd annotations are skipped, boxes (x, y, w, h) are clamped to the image, boxes that
    are empty after clamping are dropped (with one warning listing them). A category that other categories
    name as their supercategory and that no annotation uses (Roboflow exports the dataset so) is not a class. A missing image file, an
    annotation of an unknown image or category, or a malformed bbox raise ValueError / FileNotFoundError
    naming the file and the annotation."""

    def __init__(self, images_dir: str, annotations: str, transforms=None):
        self.images_dir, self.annotations_file, self.transforms = images_dir, annotations, transforms
        with open(annotations) as handle:
            data = json.load(handle)
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{annotations}: not a COCO instances file (no {key!r} list)")
        # Roboflow's COCO export lists the dataset itself as a category too: the supercategory of every other
        # one, used by no annotation. A group, not a class: left out, as it would be a class never trained.
        used = {annotation.get("category_id") for annotation in data["annotations"]}
        groups = {c.get("supercategory") for c in data["categories"] if c.get("supercategory") != c.get("name")}
        categories = sorted((c for c in data["categories"] if c["id"] in used or c.get("name") not in groups),
                            key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]  # label -> COCO category id
        self.class_names = [c.get("name", str(c["id"])) for c in categories]
        label_of = {category_id: label for label, category_id in enumerate(self.category_ids)}
        self.images = sorted(data["images"], key=lambda image: image["id"])
        by_id = {image["id"]: image for image in self.images}
        missing = [image["file_name"] for image in self.images
                   if not os.path.isfile(os.path.join(images_dir, image["file_name"]))]
        if missing:
            raise FileNotFoundError(f"{annotations}: {len(missing)} image files not found in {images_dir}, e.g. "
                                    f"{missing[:3]}")
        self.boxes = {image["id"]: [] for image in self.images}
        dropped = []
        for annotation in data["annotations"]:
            where = f"{annotations}: annotation {annotation.get('id')!r} (image {annotation.get('image_id')!r})"
            image = by_id.get(annotation.get("image_id"))
            if image is None:
                raise ValueError(f"{where} refers to an image that is not in 'images'")
            if annotation.get("category_id") not in label_of:
                raise ValueError(f"{where} has category_id {annotation.get('category_id')!r}, which is not among "
                                 f"the categories {self.category_ids}")
            if annotation.get("iscrowd", 0):
                continue
            box = annotation.get("bbox")
            if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(math.isfinite(v) for v in box)):
                raise ValueError(f"{where} has bbox {box!r}; expected four finite numbers [x, y, width, height]")
            x, y, w, h = box
            corners = (min(max(x, 0), image["width"]), min(max(y, 0), image["height"]),
                       min(max(x + w, 0), image["width"]), min(max(y + h, 0), image["height"]))
            if corners[2] <= corners[0] or corners[3] <= corners[1]:
                dropped.append(annotation.get("id"))
                continue
            self.boxes[image["id"]].append((*corners, label_of[annotation["category_id"]]))
        if dropped:
            warnings.warn(f"{annotations}: dropped {len(dropped)} annotations whose boxes are empty inside their "
                          f"image (ids {dropped[:10]}{' ...' if len(dropped) > 10 else ''})", stacklevel=2)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the transforms see (the strong augmentations stop at their stop_epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        info = self.images[index]
        path = os.path.join(self.images_dir, info["file_name"])
        with Image.open(path) as opened:
            picture = opened.convert("RGB")
        if (picture.height, picture.width) != (info["height"], info["width"]):
            raise ValueError(f"{path} is {picture.width}x{picture.height} but {self.annotations_file} says "
                             f"{info['width']}x{info['height']} (image {info['id']})")
        image = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8)
        image = image.reshape(picture.height, picture.width, 3).permute(2, 0, 1).contiguous()
        rows = torch.tensor(self.boxes[info["id"]], dtype=torch.float32).reshape(-1, 5)
        target = {"boxes": rows[:, :4], "labels": rows[:, 4].long(), "image_id": info["id"],
                  "orig_size": torch.tensor([info["height"], info["width"]])}
        if self.transforms is not None:
            image, target = self.transforms(image, target, self.epoch)
        return image, target


# ----------------------------------------------------------------------------------------------- transforms
def _box_iou(boxes: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    overlap = (torch.min(boxes[:, 2:], box[2:]) - torch.max(boxes[:, :2], box[:2])).clamp(min=0).prod(-1)
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    return overlap / (areas + (box[2:] - box[:2]).prod() - overlap)


def _keep(target: dict, keep: torch.Tensor) -> dict:
    return dict(target, boxes=target["boxes"][keep], labels=target["labels"][keep])


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    return (0.2989 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]


def _adjust_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotates the hue of a [0, 1] RGB image by `shift` turns (HSV round trip)."""
    largest, _ = image.max(0)
    smallest, _ = image.min(0)
    spread = largest - smallest
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    r, g, b = image
    hue = torch.where(largest == r, (g - b) / safe, torch.where(largest == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(spread > 0, hue / 6 % 1.0, torch.zeros_like(hue))
    hue = (hue + shift) % 1.0
    saturation = torch.where(largest > 0, spread / torch.where(largest > 0, largest, torch.ones_like(largest)), 0.0)
    sector = hue * 6
    channels = []
    for n in (5, 3, 1):  # the standard HSV -> RGB formula, one channel at a time
        k = (n + sector) % 6
        channels.append(largest - largest * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(channels)


def photometric_distort(image: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Each with probability p: brightness x U(0.875, 1.125), contrast x U(0.5, 1.5) (before or after the
    next two, at random), saturation x U(0.5, 1.5), hue + U(-0.05, 0.05), and a random channel order."""
    pixels = image.float() / 255
    contrast_first = random.random() < 0.5

    def contrast(x):
        factor = random.uniform(0.5, 1.5)
        return (factor * x + (1 - factor) * _grayscale(x).mean()).clamp(0, 1)

    if random.random() < p:
        pixels = (pixels * random.uniform(0.875, 1.125)).clamp(0, 1)
    if contrast_first and random.random() < p:
        pixels = contrast(pixels)
    if random.random() < p:
        factor = random.uniform(0.5, 1.5)
        pixels = (factor * pixels + (1 - factor) * _grayscale(pixels)).clamp(0, 1)
    if random.random() < p:
        pixels = _adjust_hue(pixels, random.uniform(-0.05, 0.05))
    if not contrast_first and random.random() < p:
        pixels = contrast(pixels)
    if random.random() < p:
        pixels = pixels[torch.randperm(3)]
    return (pixels * 255).round().to(torch.uint8)


def zoom_out(image: torch.Tensor, target: dict, p: float = 0.5, side_range=(1.0, 4.0)):
    """With probability p: the image on a zero canvas up to side_range[1] times its size, at a random place."""
    if random.random() >= p:
        return image, target
    _, height, width = image.shape
    ratio = random.uniform(*side_range)
    canvas_h, canvas_w = int(height * ratio), int(width * ratio)
    top, left = int((canvas_h - height) * random.random()), int((canvas_w - width) * random.random())
    canvas = image.new_zeros(3, canvas_h, canvas_w)
    canvas[:, top : top + height, left : left + width] = image
    shift = torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
    return canvas, dict(target, boxes=target["boxes"] + shift)


def iou_crop(image: torch.Tensor, target: dict, p: float = 0.8, trials: int = 40,
             min_ious=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0), scale=(0.3, 1.0), aspect=(0.5, 2.0)):
    """With probability p, SSD's crop: draw a minimum IoU (1.0: keep the whole image), then up to `trials`
    crops of 0.3-1 of each side and aspect 0.5-2 until one holds a box center and overlaps one of the boxes
    whose centers it holds by at least that IoU; those boxes are kept, clipped to it."""
    boxes = target["boxes"]
    if random.random() >= p or len(boxes) == 0:
        return image, target
    _, height, width = image.shape
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    while True:
        min_iou = random.choice(min_ious)
        if min_iou >= 1.0:
            return image, target
        for _ in range(trials):
            crop_w, crop_h = int(width * random.uniform(*scale)), int(height * random.uniform(*scale))
            if crop_h == 0 or not aspect[0] <= crop_w / crop_h <= aspect[1]:
                continue
            left, top = int((width - crop_w) * random.random()), int((height - crop_h) * random.random())
            crop = torch.tensor([left, top, left + crop_w, top + crop_h], dtype=boxes.dtype)
            inside = ((centers[:, 0] > crop[0]) & (centers[:, 0] < crop[2]) & (centers[:, 1] > crop[1])
                      & (centers[:, 1] < crop[3]))
            if not inside.any() or _box_iou(boxes[inside], crop).max() < min_iou:
                continue
            kept = _keep(target, inside)
            shifted = kept["boxes"] - crop[[0, 1, 0, 1]]
            shifted = torch.minimum(shifted.clamp(min=0), torch.tensor([crop_w, crop_h] * 2, dtype=boxes.dtype))
            return image[:, top : top + crop_h, left : left + crop_w], dict(kept, boxes=shifted)


def horizontal_flip(image: torch.Tensor, target: dict, p: float = 0.5):
    if random.random() >= p:
        return image, target
    width = image.shape[-1]
    boxes = target["boxes"]
    return image.flip(-1), dict(target, boxes=torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0],
                                                           boxes[:, 3]], 1))


def sanitize(target: dict, min_size: float = 1.0) -> dict:
    """Drops boxes narrower or lower than min_size pixels."""
    sizes = target["boxes"][:, 2:] - target["boxes"][:, :2]
    return _keep(target, (sizes >= min_size).all(1))


def resize(image: torch.Tensor, target: dict, size) -> tuple[torch.Tensor, dict]:
    """To `size` (height, width), bilinear with antialiasing (as model.preprocess), boxes scaled along."""
    _, height, width = image.shape
    resized = F.interpolate(image[None].float(), size=tuple(size), mode="bilinear", align_corners=False,
                            antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
    scale = torch.tensor([size[1] / width, size[0] / height] * 2, dtype=target["boxes"].dtype)
    return resized, dict(target, boxes=target["boxes"] * scale)


def finish(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """float [0, 1] pixels, and boxes as cxcywh normalized by the image size (what the model takes)."""
    _, height, width = image.shape
    boxes = target["boxes"] / torch.tensor([width, height] * 2, dtype=target["boxes"].dtype)
    boxes = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
    return image.float() / 255, dict(target, boxes=boxes)


class TrainTransforms:
    """The original training pipeline: photometric distortion (p 0.5), zoom-out (p 0.5), IoU crop (p 0.8)
    (these three only while epoch < stop_epoch: the paper's dynamic augmentation), boxes under 1 pixel
    dropped, horizontal flip (p 0.5), resize to `size`, small boxes dropped again, then normalized."""

    def __init__(self, size=(640, 640), stop_epoch: int | None = None):
        self.size, self.stop_epoch = tuple(size), stop_epoch

    def strong(self, epoch: int) -> bool:
        return self.stop_epoch is None or epoch < self.stop_epoch

    def __call__(self, image, target, epoch: int = 0):
        if self.strong(epoch):
            image = photometric_distort(image)
            image, target = zoom_out(image, target)
            image, target = iou_crop(image, target)
        target = sanitize(target)
        image, target = horizontal_flip(image, target)
        image, target = resize(image, target, self.size)
        return finish(image, sanitize(target))


class EvalTransforms:
    """Evaluation: resize to `size` and normalize, nothing random."""

    def __init__(self, size=(640, 640)):
        self.size = tuple(size)

    def __call__(self, image, target, epoch: int = 0):
        return finish(*resize(image, target, self.size))


class MultiScaleCollate:
    """Stacks a batch (every image has the transforms' size) and, while epoch < stop_epoch, resizes the whole
    batch to a side drawn from `scales` (boxes are normalized, so they stay). Nothing is padded."""

    def __init__(self, scales=TRAIN_SCALES, stop_epoch: int | None = None):
        self.scales, self.stop_epoch, self.epoch = tuple(scales), stop_epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, batch):
        images = torch.stack([image for image, _ in batch])
        targets = [target for _, target in batch]
        if self.scales and (self.stop_epoch is None or self.epoch < self.stop_epoch):
            side = random.choice(self.scales)
            images = F.interpolate(images, size=(side, side))
        return images, targets


def eval_collate(batch):
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]
