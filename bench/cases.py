"""The benchmark problems: named shapes, their random inputs, and the callables that are timed.

One home for what a benchmark runs, shared by the CLI (``python -m bench``) and the pytest-benchmark files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import rtdetrv2_kernels
from rtdetrv2_kernels import ms_deform_attn
from rtdetrv2_kernels.backends import get as get_backend

from . import peers
from .shapes import SHAPES, Shape


# What a run times unless told otherwise. The CPU set keeps the main job to minutes on a laptop.
DEFAULT_SHAPES = {
    "cpu": ["rtdetrv2-infer-b1", "rtdetrv2-infer-b4", "rtdetrv2-infer-b8", "rtdetrv2-train-b16-640", "dfine-infer-b1",
            "detr-encoder-b2"],
    "cuda": ["rtdetrv2-infer-b1", "rtdetrv2-infer-b8", "rtdetrv2-train-b16-480", "rtdetrv2-train-b16-640",
             "rtdetrv2-train-b16-800", "dfine-infer-b1", "dfine-train-b16", "detr-encoder-b2",
             "detr-encoder-b8"],
}
QUICK_SHAPES = {"cpu": ["rtdetrv2-infer-b1"], "cuda": ["rtdetrv2-infer-b1", "rtdetrv2-train-b16-640"]}
DEFAULT_DTYPES = {"cpu": ["float32"], "cuda": ["bfloat16", "float32"]}
METHODS = ("default", "discrete")
PASSES = ("forward", "forward+backward")
REFERENCE = "torch"  # the backend every speedup is measured against


@dataclass(frozen=True)
class Problem:
    """A shape with the dtype, method and device it runs in."""

    shape: Shape
    dtype: torch.dtype
    method: str
    device: str

    @property
    def label(self) -> str:
        return f"{self.shape.name} {self.method} {str(self.dtype).replace('torch.', '')} {self.device}"


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    """value, sampling_locations (a tenth of them outside [0, 1]) and softmaxed attention_weights."""
    generator = torch.Generator().manual_seed(seed)
    points = sum(shape.points)
    value = torch.randn(shape.batch, shape.rows, shape.heads, shape.channels, generator=generator)
    locations = torch.rand(shape.batch, shape.queries, shape.heads, points, 2, generator=generator) * 1.2 - 0.1
    weights = torch.randn(shape.batch, shape.queries, shape.heads, points, generator=generator).softmax(-1)
    return [t.to(device=device, dtype=dtype) for t in (value, locations, weights)]


def available_backends(device: str) -> list[str]:
    """Our backends that automatic selection may choose on `device` and that run here: not Triton's
    interpreter on CPU tensors (TRITON_INTERPRET=1), a debugging aid whose timings mean nothing and take
    minutes; name it explicitly to include it."""
    return [b for b in rtdetrv2_kernels.BACKENDS
            if get_backend(b).chosen_automatically_on(device) and get_backend(b).unavailable_reason(device) is None]


def implementations(problem: Problem, backends: list[str] | None = None,
                    with_peers: bool = True) -> dict[str, Callable]:
    """name -> fn(value, shapes, locations, weights, points, method) for every backend available on the
    problem's device (or those named) and, with_peers, every installed peer that handles the problem."""
    names = available_backends(problem.device) if backends is None else backends
    fns: dict[str, Callable] = {
        backend: (lambda *args, backend=backend: ms_deform_attn(*args, backend=backend)) for backend in names
    }
    if with_peers:
        fns.update(peers.for_problem(problem.shape.points, problem.method))
    return fns


class Runner:
    """Inputs of one problem, allocated once, and the timed closures over them."""

    def __init__(self, problem: Problem, seed: int = 0):
        self.problem = problem
        shape = problem.shape
        self.inputs = make_inputs(shape, problem.dtype, problem.device, seed)
        self.grad_inputs = [t.clone().requires_grad_() for t in self.inputs]
        self.grad_output = torch.randn(shape.batch, shape.queries, shape.heads * shape.channels,
                                       device=problem.device, dtype=problem.dtype)

    def closure(self, fn: Callable, pass_: str) -> Callable[[], None]:
        shape, method = self.problem.shape, self.problem.method
        levels, points = list(shape.levels), list(shape.points)
        if pass_ == "forward":
            value, locations, weights = self.inputs

            def forward():
                with torch.no_grad():
                    fn(value, levels, locations, weights, points, method)

            return forward
        value, locations, weights = self.grad_inputs
        needs_grad = self.grad_inputs if method == "default" else [value, weights]

        def forward_backward():
            out = fn(value, levels, locations, weights, points, method)
            torch.autograd.grad(out, needs_grad, self.grad_output)

        return forward_backward

    def memory_floor_bytes(self) -> int:
        """What the forward must move at least: every input read once, the output written once."""
        return sum(t.numel() * t.element_size() for t in (*self.inputs, self.grad_output))
