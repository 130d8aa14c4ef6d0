"""The cost of a call: a call so small that its arithmetic is nothing, timed through each way a user reaches the
op, beside torch-ms-deform-attn's call of the same problem. On a GPU a decoder layer's attention takes a few
microseconds of kernel time, so in eager inference this cost is the op's cost."""

from __future__ import annotations

import torch

from rtdetrv2_kernels import ms_deform_attn

from rtdetrv2_kernels.backends import unavailable_reason as backend_unavailable_reason

from . import peers, timing
from .shapes import SHAPES

TITLE = "The cost of a call"
CALL_SHAPE = SHAPES["call-cost"]
PEER = peers.TORCH_MS_DEFORM_ATTN


def _inputs(device: str, requires_grad: bool):
    shape = CALL_SHAPE
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(shape.batch, shape.rows, shape.heads, shape.channels, generator=generator)
    locations = torch.rand(shape.batch, shape.queries, shape.heads, sum(shape.points), 2, generator=generator)
    weights = torch.rand(shape.batch, shape.queries, shape.heads, sum(shape.points), generator=generator)
    return [t.to(device).requires_grad_(requires_grad) for t in (value, locations, weights)]


def _calls(device: str, requires_grad: bool) -> dict:
    """implementation name -> a call of it on the shape (a forward; with requires_grad, one that records the
    graph for a backward)."""
    levels, points = [list(level) for level in CALL_SHAPE.levels], list(CALL_SHAPE.points)
    value, locations, weights = _inputs(device, requires_grad)
    flat_levels = [size for level in levels for size in level]
    op = torch.ops.rtdetrv2_kernels.ms_deform_attn_forward.default
    calls = {"ms_deform_attn": lambda: ms_deform_attn(value, levels, locations, weights, points),
             "its custom op, called directly": lambda: op(value, flat_levels, locations, weights, points, "default")}
    try:
        from torch_ms_deform_attn import ms_deform_attn as peer
    except ImportError:
        return calls
    # Its own layout, made once: (L, 2) shapes and level starts as tensors, points split per level.
    shapes = torch.tensor(levels, device=device)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    peer_locations = locations.detach().unflatten(3, (len(levels), points[0])).requires_grad_(requires_grad)
    peer_weights = weights.detach().unflatten(3, (len(levels), points[0])).requires_grad_(requires_grad)
    calls[PEER] = lambda: peer(value, shapes, starts, peer_locations, peer_weights)
    return calls


def unavailable_reason(device: str) -> str | None:
    """Why the custom op cannot be called directly on `device` here, or None."""
    reason = backend_unavailable_reason(device, device)  # the "cpu" and "cuda" backends are that op
    return None if reason is None else f"its custom op cannot run on {device}: {reason}"


def time_call_cost(device: str, rounds: int, budget_s: float, threads: int) -> list[dict]:
    """Microseconds per call of each way in, at one thread and at `threads`, with inputs that need no gradient
    and with inputs that do (the call then records the graph)."""
    rows = []
    thread_counts = sorted({1, threads})
    for requires_grad in (False, True):
        calls = _calls(device, requires_grad)
        # The thread count is a Timer setting: one measure() per count.
        measured = {(name, n): t for n in thread_counts
                    for name, t in timing.measure(calls, device, rounds, budget_s, n).items()}
        for name in calls:
            row = {"implementation": name, "device": device, "inputs need grad": requires_grad}
            for n in thread_counts:
                row[f"{n} thread us"] = measured[(name, n)].median * 1e6
                row[f"{n} thread spread"] = measured[(name, n)].spread
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    counts = sorted({int(key.split()[0]) for row in rows for key in row if key.endswith(" thread us")})
    peer = {(r["device"], r["inputs need grad"]): r for r in rows if r["implementation"] == PEER}
    lines = [f"## {TITLE}", "",
             "Microseconds per call of a problem too small to cost anything to compute (B="
             f"{CALL_SHAPE.batch}, Q={CALL_SHAPE.queries}, H={CALL_SHAPE.heads}, C={CALL_SHAPE.channels}, levels "
             f"{list(CALL_SHAPE.levels)}, points {list(CALL_SHAPE.points)}), "
             f"through each way in; {PEER}'s call of the same problem beside it (its inputs prepared in its "
             "layout beforehand). Median of interleaved rounds (± interquartile range over the median).", "",
             "| implementation | device | inputs need grad | "
             + " | ".join(f"{n} thread{'s' if n > 1 else ''} us | vs {PEER}" for n in counts) + " |",
             "|---|---|---|" + "---:|---:|" * len(counts)]
    for r in rows:
        cells = [r["implementation"], r["device"], "yes" if r["inputs need grad"] else "no"]
        reference = peer.get((r["device"], r["inputs need grad"]))
        for n in counts:
            cells.append(f"{r[f'{n} thread us']:.1f} ± {100 * r[f'{n} thread spread']:.0f}%")
            cells.append(f"{reference[f'{n} thread us'] / r[f'{n} thread us']:.2f}x" if reference else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
