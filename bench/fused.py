"""The fused attention core (ms_deform_attn_fused) against what RT-DETRv2's decoder does without it: the
softmax and the sampling-location math as eager PyTorch ops, then the plain op, on the same backend."""

from __future__ import annotations

import torch

from rtdetrv2_kernels import ms_deform_attn, ms_deform_attn_fused

from . import timing
from .cases import PASSES, SHAPES, Shape

# RT-DETRv2 inference and training, and the family's training shapes (python_model trains on the fused op).
FUSED_SHAPES = ("rtdetrv2-infer-b1", "rtdetrv2-train-b16-640", "deimv2-s-train-b4", "rfdetr-base-train-b4")
OFFSET_SCALE = 0.5


def _inputs(shape: Shape, dtype, device):
    generator = torch.Generator().manual_seed(0)
    points = sum(shape.points)
    value = torch.randn(shape.batch, shape.rows, shape.heads, shape.channels, generator=generator)
    boxes = torch.cat([torch.rand(shape.batch, shape.queries, 1, 2, generator=generator),
                       torch.rand(shape.batch, shape.queries, 1, 2, generator=generator) * 0.5 + 0.05], -1)
    offsets = torch.randn(shape.batch, shape.queries, shape.heads, points, 2, generator=generator)
    logits = torch.randn(shape.batch, shape.queries, shape.heads, points, generator=generator)
    return [t.to(device=device, dtype=dtype) for t in (value, boxes, offsets, logits)]


def time_fused(device: str, dtype, backends: list[str], rounds: int, budget_s: float, threads: int) -> list[dict]:
    rows = []
    for name in FUSED_SHAPES:
        shape = SHAPES[name]
        levels, points = list(shape.levels), list(shape.points)
        inputs = _inputs(shape, dtype, device)
        grad_inputs = [t.clone().requires_grad_() for t in inputs]
        grad_output = torch.randn(shape.batch, shape.queries, shape.heads * shape.channels, device=device, dtype=dtype)
        # What the decoder holds as a buffer: offset_scale / n_l for each point.
        point_scale = torch.tensor([OFFSET_SCALE / n for n in points for _ in range(n)], device=device, dtype=dtype)

        def eager(value, boxes, offsets, logits, backend):
            locations = boxes[:, :, None, :, :2] + offsets * point_scale[:, None] * boxes[:, :, None, :, 2:]
            return ms_deform_attn(value, levels, locations, logits.softmax(-1), points, backend=backend)

        def fused(value, boxes, offsets, logits, backend):
            return ms_deform_attn_fused(value, levels, boxes, offsets, logits, points, OFFSET_SCALE, backend=backend)

        fns = {}
        for backend in backends:
            for variant, fn in (("fused", fused), ("eager prologue", eager)):
                def forward(fn=fn, backend=backend):
                    with torch.no_grad():
                        fn(*inputs, backend)

                def forward_backward(fn=fn, backend=backend):
                    torch.autograd.grad(fn(*grad_inputs, backend), grad_inputs, grad_output)

                fns[(backend, variant, "forward")] = forward
                fns[(backend, variant, "forward+backward")] = forward_backward
        measured = timing.measure(fns, device, rounds, budget_s, threads)
        for backend in backends:
            for pass_ in PASSES:
                fused_ms = measured[(backend, "fused", pass_)].median * 1e3
                eager_ms = measured[(backend, "eager prologue", pass_)].median * 1e3
                rows.append({"shape": name, "device": device, "dtype": str(dtype).replace("torch.", ""),
                             "backend": backend, "pass": pass_, "fused ms": fused_ms, "eager prologue ms": eager_ms,
                             "speedup": eager_ms / fused_ms})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["## Fused attention core", "",
             "`ms_deform_attn_fused` against eager softmax + location math + `ms_deform_attn`, same backend.", "",
             "| shape | device | dtype | backend | pass | fused ms | eager prologue ms | speedup |",
             "|---|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['shape']} | {r['device']} | {r['dtype']} | {r['backend']} | {r['pass']} | {r['fused ms']:.3f} | "
              f"{r['eager prologue ms']:.3f} | {r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines)
