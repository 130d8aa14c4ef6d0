"""A small synthetic COCO-format detection dataset: filled squares, discs and triangles (three classes) of
random colours and sizes on noisy, striped backgrounds. For checking that training learns (tests, and
bench/results' recorded AP50) without downloading anything:

    python -m python_model synthetic DIR [--train 300 --val 60 --size 128]

writes DIR/train/ and DIR/val/, each with its images and an instances.json.
"""

from __future__ import annotations

import json
import os

import torch

CLASSES = ("square", "disc", "triangle")


def _background(size: int, generator: torch.Generator) -> torch.Tensor:
    """(3, size, size) float: a random colour, stripes at a random angle and frequency, and pixel noise."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    angle = torch.rand((), generator=generator) * torch.pi
    frequency = 0.05 + 0.25 * torch.rand((), generator=generator)
    stripes = torch.sin((x * angle.cos() + y * angle.sin()) * frequency)
    base = torch.rand(3, 1, 1, generator=generator) * 0.6 + 0.2
    noise = torch.rand(3, size, size, generator=generator) - 0.5
    return (base + 0.15 * stripes + 0.2 * noise).clamp(0, 1)


def _shape_mask(kind: int, size: int, box) -> torch.Tensor:
    x0, y0, x1, y1 = box
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5, torch.arange(size, dtype=torch.float32) + 0.5,
                          indexing="ij")
    inside_box = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    if kind == 0:
        return inside_box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if kind == 1:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    # A triangle with its apex at the top centre and its base along the bottom edge of the box.
    half_width = (y - y0) / (y1 - y0) * rx
    return inside_box & ((x - cx).abs() <= half_width)


def make_image(size: int, generator: torch.Generator, max_objects: int = 4):
    """A (3, size, size) uint8 image and its (up to max_objects, non-overlapping) objects as
    (class, [x, y, w, h]) in pixels."""
    image = _background(size, generator)
    objects = []
    for _ in range(int(torch.randint(1, max_objects + 1, (), generator=generator))):
        side = int(torch.randint(size // 8, size // 3, (), generator=generator))
        aspect = 0.7 + 0.6 * float(torch.rand((), generator=generator))
        width, height = max(4, int(side * aspect)), side
        x0 = int(torch.randint(0, size - width, (), generator=generator))
        y0 = int(torch.randint(0, size - height, (), generator=generator))
        if any(x0 < x + w and x < x0 + width and y0 < y + h and y < y0 + height for _, (x, y, w, h) in objects):
            continue  # no overlaps: every box shows its whole object
        kind = int(torch.randint(0, len(CLASSES), (), generator=generator))
        mask = _shape_mask(kind, size, (x0, y0, x0 + width, y0 + height))
        colour = torch.rand(3, 1, 1, generator=generator)
        image = torch.where(mask, colour, image)
        objects.append((kind, [x0, y0, width, height]))
    return (image * 255).round().to(torch.uint8), objects


def write_split(directory: str, count: int, size: int, seed: int) -> str:
    """Writes `count` images and their instances.json into `directory`; returns the JSON's path."""
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    images, annotations = [], []
    for index in range(count):
        pixels, objects = make_image(size, generator)
        name = f"{index:05d}.png"
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(os.path.join(directory, name))
        images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
        for kind, box in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": kind + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    path = os.path.join(directory, "instances.json")
    with open(path, "w") as handle:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]}, handle)
    return path


def write_dataset(root: str, train: int = 300, val: int = 60, size: int = 128, seed: int = 0) -> str:
    """DIR/train and DIR/val (different images: different seeds)."""
    write_split(os.path.join(root, "train"), train, size, seed)
    write_split(os.path.join(root, "val"), val, size, seed + 1)
    return root
