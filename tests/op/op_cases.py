"""The forms of the op as one table, for the tests that are the same for each (test_op_cases.py): the plain op
(ms_deform_attn), the fused op (ms_deform_attn_fused) with reference boxes and with reference points per
level, and the level table in tensors (compat.ms_deform_attn_v1 on Deformable DETR's layout). Each case makes
its inputs, calls itself on a backend, names its differentiable inputs and says which backends run it."""

from __future__ import annotations

import abc
import dataclasses

import pytest
import torch
from helpers import FUSED_POINTS, POINTS, SHAPES, has_tensor_levels, make_fused_inputs, make_inputs, place_levels

from rtdetrv2_kernels import compat, ms_deform_attn, ms_deform_attn_fused


@dataclasses.dataclass(frozen=True)
class Layout:
    """The sizes of one call."""

    batch: int
    queries: int
    heads: int
    channels: int
    shapes: tuple[tuple[int, int], ...]
    points: tuple[int, ...]  # per level

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return self.batch, self.queries, self.heads * self.channels

    def sizes(self) -> dict:
        """The keyword arguments of make_inputs and make_fused_inputs."""
        return dict(batch=self.batch, queries=self.queries, heads=self.heads, channels=self.channels,
                    shapes=self.shapes, points=self.points)


class OpCase(abc.ABC):
    """One form of the op. `tiny` is small enough for gradcheck in Triton's interpreter (gradcheck calls the
    op twice per input element); `standard` has the models' C = 32."""

    name: str
    input_names: tuple[str, ...]  # the differentiable inputs, in the order inputs() returns them
    methods: tuple[str, ...] = ("default", "discrete")
    tiny: Layout
    standard: Layout

    @abc.abstractmethod
    def inputs(self, layout: Layout, device="cpu", dtype=torch.float64, seed=0) -> list[torch.Tensor]:
        """Fresh random inputs, without the exact pixel centres and level edges (kinks) of make_inputs."""

    @abc.abstractmethod
    def op(self, layout: Layout, backend: str, method: str, device="cpu"):
        """The op as a function of inputs(layout, device) on `backend`."""

    def runs_on(self, backend: str) -> bool:
        return True


class PlainOp(OpCase):
    name = "plain"
    input_names = ("value", "sampling_locations", "attention_weights")
    tiny = Layout(1, 2, 2, 2, ((2, 4), (3, 2)), (2, 1))
    standard = Layout(2, 5, 3, 32, tuple(SHAPES), tuple(POINTS))

    def inputs(self, layout, device="cpu", dtype=torch.float64, seed=0):
        return list(make_inputs(**layout.sizes(), dtype=dtype, device=device, borders=False, seed=seed))

    def op(self, layout, backend, method, device="cpu"):
        return lambda v, l, w: ms_deform_attn(v, layout.shapes, l, w, layout.points, method, backend=backend)


class FusedOp(OpCase):
    """Reference boxes (one row, as RT-DETRv2 passes them) or reference points (one row per level)."""

    input_names = ("value", "reference_points", "sampling_offsets", "attention_logits")
    tiny = Layout(1, 2, 1, 2, ((2, 3), (2, 2)), (1, 2))
    standard = Layout(2, 5, 3, 32, tuple(SHAPES), tuple(FUSED_POINTS))

    def __init__(self, reference: str):
        self.reference = reference
        self.name = f"fused-{reference}"

    def inputs(self, layout, device="cpu", dtype=torch.float64, seed=0):
        return make_fused_inputs(**layout.sizes(), reference=self.reference, per_level=self.reference == "points",
                                 dtype=dtype, device=device, seed=seed)

    def op(self, layout, backend, method, device="cpu"):
        return lambda v, r, o, a: ms_deform_attn_fused(v, layout.shapes, r, o, a, layout.points, 0.5, method,
                                                       backend=backend)


def reversed_levels(shapes):
    """(level starts, rows) of a value holding the levels last one first, each after an unused row: out of
    order and padded, as level_start_index allows."""
    starts, row = [0] * len(shapes), 0
    for level in reversed(range(len(shapes))):
        height, width = shapes[level]
        starts[level] = row + 1
        row += 1 + height * width
    return starts, row + 1


class TensorLevelsOp(OpCase):
    """Deformable DETR's call: the same number of points on every level, value's levels where
    level_start_index says, the level table as tensors on value's device. Bilinear sampling only."""

    name = "tensor-levels"
    input_names = ("value", "sampling_locations", "attention_weights")
    methods = ("default",)
    tiny = Layout(1, 2, 1, 2, ((2, 3), (1, 2)), (2, 2))
    standard = Layout(2, 5, 3, 32, tuple(SHAPES), (2, 2, 2))

    def inputs(self, layout, device="cpu", dtype=torch.float64, seed=0):
        value, locations, weights = make_inputs(**layout.sizes(), dtype=dtype, device=device, borders=False,
                                                seed=seed)
        per_level = (*weights.shape[:3], len(layout.shapes), layout.points[0])
        return [place_levels(value, layout.shapes, *reversed_levels(layout.shapes)),
                locations.view(*per_level, 2), weights.view(per_level)]

    def op(self, layout, backend, method, device="cpu"):
        # Made before the call, so that a CUDA graph capture does not copy them from the host.
        table = (torch.tensor(layout.shapes, device=device),
                 torch.tensor(reversed_levels(layout.shapes)[0], device=device))
        return lambda v, l, w: compat.ms_deform_attn_v1(v, *table, l, w, backend=backend)

    def runs_on(self, backend):
        return has_tensor_levels(backend)


OP_CASES = [PlainOp(), FusedOp("boxes"), FusedOp("points"), TensorLevelsOp()]


def case_params(backends_and_devices):
    """pytest parameters (case, backend, device, method) for every case, each (backend, device) pair that
    runs it and each of its methods."""
    pairs = list(backends_and_devices)
    return [pytest.param(case, backend, device, method, id=f"{case.name}-{method}-{backend}-{device}")
            for case in OP_CASES for backend, device in pairs if case.runs_on(backend) for method in case.methods]
