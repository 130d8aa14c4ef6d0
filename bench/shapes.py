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
        # The family's newer head sizes and layouts: a DEIMv2-like decoder with 16-channel heads, and RF-DETR
        # base's decoder (16 heads of 16, one 35x35 level of its 560x560 input, 2 points).
        Shape("deimv2-c16-infer-b1", 1, 300, feature_levels(640), (3, 6, 3), channels=16),
        Shape("rfdetr-base-infer-b1", 1, 300, ((35, 35),), (2,), heads=16, channels=16),
        Shape("tiny", 2, 20, ((6, 10), (3, 5)), (2, 3), heads=2, channels=8),  # smoke runs
    ]
    return {shape.name: shape for shape in shapes}


SHAPES = _shapes()
