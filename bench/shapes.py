"""The named problem sizes of the benchmark: one home for them, shared by the timing CLI, the pytest-benchmark
files and the GPU simulation harness (bench/gpusim/), which runs without torch, so nothing here imports it."""

from __future__ import annotations

from dataclasses import dataclass, replace


def feature_levels(image_size: int) -> tuple:
    """RT-DETRv2's three levels (strides 8, 16, 32) for a square input image."""
    return tuple((image_size // stride, image_size // stride) for stride in (8, 16, 32))


DETR_ENCODER_LEVELS = ((100, 152), (50, 76), (25, 38), (13, 19))  # 20197 rows; encoder queries = rows


@dataclass(frozen=True)
class Shape:
    """One MSDA problem size: batch, queries, (H_l, W_l) per level, points per level, heads, channels."""

    name: str
    batch: int
    queries: int
    levels: tuple
    points: tuple
    heads: int = 8
    channels: int = 32
    # Report the forward's memory-traffic floor: only where the samples cover all of value (an encoder,
    # queries = rows), so reading it whole is needed; a decoder's few queries touch a small part of it.
    floor: bool = False

    @property
    def rows(self) -> int:
        return sum(h * w for h, w in self.levels)

    def with_(self, **changes) -> "Shape":
        return replace(self, **changes)


def _square(image_size: int, strides) -> tuple:
    return tuple((image_size // stride, image_size // stride) for stride in strides)


# DEIMv2's decoders by size (Intellindust-AI-Lab/DEIMv2 configs; 8 heads each): (size, channels per head,
# strides, points per level, inference image, queries). Training adds up to 200 denoising queries.
DEIMV2 = (("atto", 8, (16, 32), (4, 2), 320, 100), ("femto", 12, (16, 32), (4, 2), 416, 150),
          ("pico", 14, (16, 32), (4, 2), 640, 200), ("n", 16, (16, 32), (6, 6), 640, 300),
          ("s", 24, (8, 16, 32), (3, 6, 3), 640, 300), ("m", 32, (8, 16, 32), (3, 6, 3), 640, 300),
          ("l", 28, (8, 16, 32), (3, 6, 3), 640, 300))  # x: as m (more decoder layers)
# RF-DETR (rfdetr 1.11.2 config.py; 16 heads of 16, one level, 2 points, 300 queries, x13 groups in training):
# (size, level side = resolution / patch size).
RFDETR = (("nano", 24), ("small", 32), ("medium", 36), ("base", 40), ("large", 44))
GROUP_DETR = 13


def _family_shapes() -> list[Shape]:
    """The family's decoders (issue: fast for the whole family): DEIMv2 by size, D-FINE N, RF-DETR by size
    for inference and training (group-DETR queries), LW-DETR large (two levels of 4 points, 24 heads of 16)."""
    shapes = []
    for size, channels, strides, points, image, queries in DEIMV2:
        shapes.append(Shape(f"deimv2-{size}-infer-b1", 1, queries, _square(image, strides), points, channels=channels))
    shapes.append(Shape("deimv2-s-train-b4", 4, 300 + 200, _square(640, (8, 16, 32)), (3, 6, 3), channels=24))
    shapes.append(Shape("deimv2-atto-train-b4", 4, 100 + 200, _square(320, (16, 32)), (4, 2), channels=8))
    shapes.append(Shape("dfine-n-infer-b1", 1, 300, _square(640, (16, 32)), (6, 6), channels=16))
    for size, side in RFDETR:
        shapes.append(Shape(f"rfdetr-{size}-infer-b1", 1, 300, ((side, side),), (2,), heads=16, channels=16))
    for size, side in RFDETR[:1] + RFDETR[3:4]:
        shapes.append(Shape(f"rfdetr-{size}-train-b4", 4, 300 * GROUP_DETR, ((side, side),), (2,), heads=16,
                            channels=16))
    shapes.append(Shape("lwdetr-large-infer-b1", 1, 300, _square(640, (8, 32)), (4, 4), heads=24, channels=16))
    return shapes


def _shapes() -> dict[str, Shape]:
    shapes = [
        Shape("rtdetrv2-infer-b1", 1, 300, feature_levels(640), (4, 4, 4)),
        Shape("rtdetrv2-infer-b4", 4, 300, feature_levels(640), (4, 4, 4)),  # the CPU kernel's B=4 target
        Shape("rtdetrv2-infer-b8", 8, 300, feature_levels(640), (4, 4, 4)),
        *(Shape(f"rtdetrv2-train-b16-{size}", 16, 500, feature_levels(size), (4, 4, 4))
          for size in range(480, 801, 32)),  # RT-DETRv2's multi-scale training sizes
        Shape("dfine-infer-b1", 1, 300, feature_levels(640), (3, 6, 3)),
        Shape("dfine-train-b16", 16, 500, feature_levels(640), (3, 6, 3)),
        Shape("detr-encoder-b2", 2, 20197, DETR_ENCODER_LEVELS, (4, 4, 4, 4), floor=True),
        Shape("detr-encoder-b8", 8, 20197, DETR_ENCODER_LEVELS, (4, 4, 4, 4), floor=True),
        # A DEIMv2-like decoder with 16-channel heads on three levels (the GPU simulation harness's), and the
        # family's decoders as their configs give them.
        Shape("deimv2-c16-infer-b1", 1, 300, feature_levels(640), (3, 6, 3), channels=16),
        *_family_shapes(),
        Shape("tiny", 2, 20, ((6, 10), (3, 5)), (2, 3), heads=2, channels=8),  # smoke runs
        Shape("call-cost", 1, 8, ((4, 4), (2, 2)), (2, 2), heads=2, channels=8),  # bench/call_cost.py
    ]
    return {shape.name: shape for shape in shapes}


SHAPES = _shapes()
