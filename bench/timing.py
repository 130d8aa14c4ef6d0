"""Timing and memory measurement.

Every implementation of a problem is timed in interleaved rounds, so that a machine whose speed drifts
(shared CPUs, GPU clocks) slows all of them alike; each round yields one sample (mean seconds per call
over enough calls to fill the round's budget). CPU rounds use ``torch.utils.benchmark.Timer`` at a fixed
thread count; GPU rounds use CUDA events, and replay a CUDA graph of the call when the problem is small
enough that launch overhead would otherwise be what is measured.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Hashable

import torch
import torch.utils.benchmark


def pin_malloc_thresholds() -> str:
    """Fixes glibc's malloc thresholds for the whole benchmark process; returns what was set, for the report.

    By default glibc adapts them as blocks are freed: whether a multi-MiB block (a gradient, a reference's
    temporary) is served from the heap or freshly mapped, page fault by page fault, depends on what ran before.
    Measured here: our B=1 forward+backward took 1.6-1.8 ms or 4.1-4.6 ms, and the PyTorch reference's 12 or
    17 ms, with the same code, depending on which problems preceded it. Pinned, every implementation gets the
    same allocator: blocks up to 32 MiB (glibc's largest threshold) come from the heap, which is not trimmed
    below 256 MiB of free space; larger ones are mapped, as before."""
    if not sys.platform.startswith("linux"):
        return "default"
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return "default"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 256 << 20):
        return "glibc mmap_threshold=32MiB trim_threshold=256MiB"
    return "default"


@dataclass
class Timing:
    samples: list  # seconds per call, one per round
    mode: str  # "eager" or "cuda-graph"

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range over the median: 0.05 means the middle half of the rounds lie within 5%."""
        if len(self.samples) < 2:
            return 0.0
        low, _, high = statistics.quantiles(self.samples, n=4, method="inclusive")
        return (high - low) / self.median


def cuda_graph_replay(fn: Callable[[], None]) -> Callable[[], None]:
    """fn captured once in a CUDA graph; calling the result replays it (no CPU launch cost per kernel)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: lazy initialization must not be captured
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _time_calls(fn: Callable[[], None], calls: int, device: str, threads: int) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.timeit(calls).median


def measure(fns: dict[Hashable, Callable[[], None]], device: str, rounds: int, budget_s: float,
            threads: int, cuda_graphs: bool = False) -> dict[Hashable, Timing]:
    """Times every fn in interleaved rounds, spending about `budget_s` in all: `rounds` rounds, or fewer
    (never under 3, for a median) when single calls are so slow that one call per fn and round would take
    several times the budget. With cuda_graphs, each fn that can be captured is timed as a graph replay."""
    modes = {}
    calls = {}
    runnable = {}
    round_s = 0.0
    for key, fn in fns.items():
        mode = "eager"
        if cuda_graphs and device == "cuda":
            try:
                fn = cuda_graph_replay(fn)
                mode = "cuda-graph"
            except RuntimeError:  # an implementation that syncs or allocates on the host cannot be captured
                torch.cuda.synchronize()
        fn()  # warm-up (first-call compilation, caching allocator growth)
        one = max(_time_calls(fn, 1, device, threads), 1e-7)
        calls[key] = max(1, int(budget_s / rounds / len(fns) / one))
        round_s += calls[key] * one
        runnable[key], modes[key] = fn, mode
    rounds = max(3, min(rounds, int(3 * budget_s / round_s)))
    samples: dict[Hashable, list] = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in runnable.items():
            samples[key].append(_time_calls(fn, calls[key], device, threads))
    return {key: Timing(samples[key], modes[key]) for key in fns}


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ side logs every session's start and stop on file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], None], device: str) -> int:
    """Bytes allocated by one call at its peak, beyond what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # The CPU allocator reports each allocation and free to the profiler, C++ kernels' included.
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    in_use = peak = 0
    for _, nbytes in changes:
        in_use += nbytes
        peak = max(peak, in_use)
    return peak


def copy_bandwidth(device: str, threads: int) -> float:
    """Bytes per second of a large copy, counting bytes read plus bytes written."""
    source = torch.randn(2**28 // 4, device=device).view(torch.int32)  # 256 MiB, larger than any cache
    target = torch.empty_like(source)
    seconds = measure({"copy": lambda: target.copy_(source)}, device, rounds=5, budget_s=0.5,
                      threads=threads)["copy"].median
    return 2 * source.numel() * source.element_size() / seconds


def record(row: dict, measured: dict[Hashable, Timing]) -> dict:
    """Adds each implementation's median ms and spread to a report row, as "<name> ms" / "<name> spread"."""
    for label, timed in measured.items():
        row[f"{label} ms"], row[f"{label} spread"] = timed.median * 1e3, timed.spread
    return row


def comparison_table(title: str, text: str, rows: list[dict], settings: list[str], timed: list[str],
                     speedups: list[str], digits: int = 1) -> str:
    """A markdown section: one line per row with its `settings` columns, each `timed` implementation's
    median ms and spread ("12.3 ± 4%") and the `speedups` columns ("1.50x")."""
    header = [*settings, *(f"{label} ms" for label in timed), *speedups]
    lines = [f"## {title}", "", text, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(settings) + "---:|" * (len(timed) + len(speedups))]
    for row in rows:
        cells = [str(row[name]) for name in settings]
        cells += [f"{row[label + ' ms']:.{digits}f} ± {100 * row[label + ' spread']:.0f}%" for label in timed]
        cells += [f"{row[name]:.2f}x" for name in speedups]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
