"""The main job: a correctness self-check of every available backend, then a benchmark table.

    python bench/msda_bench.py [--quick] [--out DIR]

Backends are timed side by side in one run, in interleaved rounds so that a machine whose speed drifts
(shared CPUs) slows all of them alike; the table reports the median per call and the speedup over the
PyTorch reference ("torch"). GPU times come from CUDA events. Exits non-zero if the self-check fails.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import rtdetrv2_kernels
from rtdetrv2_kernels import ms_deform_attn, ms_deform_attn_reference
from rtdetrv2_kernels.backends import unavailable_reason

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    queries: int
    shapes: tuple
    points: tuple
    heads: int = 8
    channels: int = 32
    dtype: torch.dtype = torch.float32
    method: str = "default"
    floor: bool = False  # report the forward's memory-traffic floor (bytes that must move / copy bandwidth)


RTDETR_LEVELS = ((80, 80), (40, 40), (20, 20))
DETR_ENCODER_LEVELS = ((100, 152), (50, 76), (25, 38), (13, 19))  # 20197 rows: queries = rows in the encoder
PEER = "torch-ms-deform-attn"  # PyPI's fused kernels (fixed points per level, bilinear), timed when installed
CASES = {
    "cpu": [
        Case("RT-DETRv2 decoder B=1", 1, 300, RTDETR_LEVELS, (4, 4, 4)),
        Case("RT-DETRv2 decoder B=4", 4, 300, RTDETR_LEVELS, (4, 4, 4)),
        Case("RT-DETRv2 decoder B=1 discrete", 1, 300, RTDETR_LEVELS, (4, 4, 4), method="discrete"),
        Case("D-FINE decoder B=1 [3,6,3]", 1, 300, RTDETR_LEVELS, (3, 6, 3)),
    ],
    "cuda": [
        Case("RT-DETRv2 decoder training B=16 bf16", 16, 500, RTDETR_LEVELS, (4, 4, 4), dtype=torch.bfloat16),
        Case("RT-DETRv2 decoder training B=16 fp32", 16, 500, RTDETR_LEVELS, (4, 4, 4)),
        Case("RT-DETRv2 decoder training B=16 bf16 discrete", 16, 500, RTDETR_LEVELS, (4, 4, 4),
             dtype=torch.bfloat16, method="discrete"),
        Case("RT-DETRv2 decoder inference B=1 fp32", 1, 300, RTDETR_LEVELS, (4, 4, 4)),
        Case("D-FINE decoder B=16 bf16 [3,6,3]", 16, 500, RTDETR_LEVELS, (3, 6, 3), dtype=torch.bfloat16),
        Case("Deformable-DETR encoder B=8 bf16", 8, 20197, DETR_ENCODER_LEVELS, (4, 4, 4, 4),
             dtype=torch.bfloat16, floor=True),
    ],
}


def make_inputs(case: Case, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows = sum(h * w for h, w in case.shapes)
    points = sum(case.points)
    value = torch.randn(case.batch, rows, case.heads, case.channels, generator=generator)
    locations = torch.rand(case.batch, case.queries, case.heads, points, 2, generator=generator) * 1.2 - 0.1
    weights = torch.randn(case.batch, case.queries, case.heads, points, generator=generator).softmax(-1)
    return [t.to(device=device, dtype=case.dtype) for t in (value, locations, weights)]


def available(device: str) -> list[str]:
    return [b for b in rtdetrv2_kernels.BACKENDS if unavailable_reason(b, device) is None]


# --------------------------------------------------------------------------------------------- self-check
def self_check(device: str) -> list[str]:
    """Each backend against the fp64 reference: forward and all gradients, both methods. Returns failures."""
    failures = []
    shapes, points = ((6, 10), (5, 3), (2, 2)), (3, 6, 3)  # non-square levels, D-FINE-style points
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    for backend in available(device):
        for dtype in dtypes:
            for method in ("default", "discrete"):
                case = Case("check", 2, 7, shapes, points, heads=3, channels=19, dtype=dtype, method=method)
                inputs = make_inputs(case, device, seed=1)
                grad_output = torch.randn(2, 7, 3 * 19, dtype=torch.float64)

                def run(fn, tensors):
                    tensors = [t.detach().clone().requires_grad_() for t in tensors]
                    out = fn(*tensors)
                    return [out, *torch.autograd.grad(out, tensors, grad_output.to(out))]

                expected = run(lambda v, l, w: ms_deform_attn_reference(v, shapes, l, w, points, method),
                               [t.double().cpu() for t in inputs])
                actual = run(lambda v, l, w: ms_deform_attn(v, shapes, l, w, points, method, backend=backend), inputs)
                tolerance = 2e-5 if dtype == torch.float32 else 2e-2
                for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
                    scale = max(1.0, e.abs().max().item())
                    error = (a.double().cpu() - e).abs().max().item()
                    if not error <= tolerance * scale:
                        failures.append(f"{backend}/{device}/{dtype}/{method}: {name} error {error:.3g}")
                print(f"  self-check {backend:6s} {device:4s} {str(dtype):15s} {method:8s} "
                      f"{'FAIL' if failures and failures[-1].startswith(backend) else 'ok'}")
    return failures


# ------------------------------------------------------------------------------------------------ timing
def _timer(device: str):
    if device == "cuda":
        def time_calls(fn, reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
    else:
        def time_calls(fn, reps):
            begin = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - begin) / reps
    return time_calls


def measure(fns: dict, device: str, rounds: int, budget_s: float) -> dict[str, float]:
    """Median seconds per call of each fn, timed in interleaved rounds."""
    time_calls = _timer(device)
    reps = {}
    for name, fn in fns.items():  # warm up, and size each round to about budget_s / rounds per fn
        fn()
        one = max(time_calls(fn, 1), 1e-6)
        reps[name] = max(1, int(budget_s / rounds / len(fns) / one))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_calls(fn, reps[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    source = torch.randn(2**28 // 4, device=device).view(torch.int32)  # 256 MiB, larger than any cache
    target = torch.empty_like(source)
    seconds = measure({"copy": lambda: target.copy_(source)}, device, rounds=5, budget_s=0.5)["copy"]
    return 2 * source.numel() * source.element_size() / seconds


def peer_functions(case: Case, value, locations, weights, grad_inputs, grad_output) -> dict:
    """The peer's forward and forward+backward on the same problem, where it applies (bilinear, the same
    number of points on every level); empty when the peer is not installed."""
    try:
        from torch_ms_deform_attn import ms_deform_attn as peer
    except ImportError:
        return {}
    levels, points = len(case.shapes), case.points[0]
    if case.method != "default" or any(p != points for p in case.points):
        return {}
    shapes = torch.tensor(case.shapes, dtype=torch.long, device=value.device)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])

    def call(v, l, w):  # our (.., sum(P), ..) layout is the peer's (.., L, P, ..) one, flattened
        return peer(v, shapes, starts, l.unflatten(3, (levels, points)), w.unflatten(3, (levels, points)))

    with torch.no_grad():
        error = (call(value, locations, weights).double() -
                 ms_deform_attn(value, case.shapes, locations, weights, case.points).double()).abs().max().item()
    tolerance = 1e-4 if case.dtype == torch.float32 else 2e-2
    if not error <= tolerance:
        raise RuntimeError(f"{PEER} disagrees with rtdetrv2_kernels on {case.name}: max error {error:.3g}")

    def forward():
        with torch.no_grad():
            call(value, locations, weights)

    def forward_backward():
        torch.autograd.grad(call(*grad_inputs), grad_inputs, grad_output)

    return {(PEER, "forward"): forward, (PEER, "forward+backward"): forward_backward}


def benchmark_case(case: Case, device: str, rounds: int, budget_s: float, bandwidth: float | None) -> list[dict]:
    value, locations, weights = make_inputs(case, device)
    grad_inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    grad_output = torch.randn(case.batch, case.queries, case.heads * case.channels, device=device, dtype=case.dtype)
    fns = {}
    for backend in available(device):
        def forward(backend=backend):
            with torch.no_grad():
                ms_deform_attn(value, case.shapes, locations, weights, case.points, case.method, backend=backend)

        def forward_backward(backend=backend):
            out = ms_deform_attn(*grad_inputs[:1], case.shapes, grad_inputs[1], grad_inputs[2], case.points,
                                 case.method, backend=backend)
            torch.autograd.grad(out, grad_inputs, grad_output)

        fns[(backend, "forward")] = forward
        fns[(backend, "forward+backward")] = forward_backward
    fns.update(peer_functions(case, value, locations, weights, grad_inputs, grad_output))
    times = measure(fns, device, rounds, budget_s)
    floor_ms = None
    if case.floor and bandwidth:  # each input read once, the output written once
        moved = sum(t.numel() * t.element_size() for t in (value, locations, weights)) + grad_output.numel() * \
            grad_output.element_size()
        floor_ms = moved / bandwidth * 1e3
    rows = []
    for (backend, pass_), seconds in times.items():
        baseline = times.get(("torch", pass_))
        peer = times.get((PEER, pass_))
        rows.append(dict(case=case.name, device=device, dtype=str(case.dtype).replace("torch.", ""),
                         method=case.method, backend=backend, pass_=pass_, ms=seconds * 1e3,
                         speedup_vs_torch=baseline / seconds if baseline else None,
                         speedup_vs_peer=peer / seconds if peer and backend != PEER else None,
                         times_floor=seconds * 1e3 / floor_ms if floor_ms and pass_ == "forward" else None))
    return rows


# ----------------------------------------------------------------------------------------------- report
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=commit or "unknown", torch=torch.__version__, python=platform.python_version(),
                cpu=_cpu_name(), threads=torch.get_num_threads(),
                backends=rtdetrv2_kernels.available_backends())
    try:
        info[PEER] = importlib.metadata.version(PEER)
    except importlib.metadata.PackageNotFoundError:
        info[PEER] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def markdown(info: dict, rows: list[dict]) -> str:
    lines = ["# rtdetrv2_kernels benchmark", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", f"| case | device | dtype | backend | pass | ms / call | speedup vs torch | vs {PEER} | "
              "x memory floor |", "|---|---|---|---|---|---:|---:|---:|---:|"]

    def ratio(x):
        return f"{x:.2f}x" if x else "-"

    for r in rows:
        lines.append(f"| {r['case']} | {r['device']} | {r['dtype']} | {r['backend']} | {r['pass_']} | "
                     f"{r['ms']:.3f} | {ratio(r['speedup_vs_torch'])} | {ratio(r['speedup_vs_peer'])} | "
                     f"{ratio(r['times_floor'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter budget (a smoke run)")
    parser.add_argument("--out", type=Path, help="directory for benchmark.md and benchmark.json")
    parser.add_argument("--device", choices=["cpu", "cuda"], action="append",
                        help="only this device (repeatable); default: the CPU and, when present, the GPU")
    args = parser.parse_args(argv)
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    info = environment()
    print(f"rtdetrv2_kernels on {info}")

    print("self-check against the fp64 reference:")
    failures = [f for device in devices for f in self_check(device)]
    if failures:
        print("SELF-CHECK FAILED:\n  " + "\n  ".join(failures))
        return 1

    rounds, budget = (3, 0.5) if args.quick else (7, 4.0)
    rows = []
    for device in devices:
        bandwidth = copy_bandwidth(device) if device == "cuda" else None
        if bandwidth:
            info["copy_bandwidth_GBps"] = round(bandwidth / 1e9)
        for case in CASES[device]:
            print(f"timing {case.name} on {device} ...", flush=True)
            rows += benchmark_case(case, device, rounds, budget, bandwidth)
    report = markdown(info, rows)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark.md").write_text(report)
        (args.out / "benchmark.json").write_text(json.dumps(dict(environment=info, results=rows), indent=2))
        print(f"wrote {args.out / 'benchmark.md'} and benchmark.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
