"""``python -m bench``: the main job.

First a correctness self-check of every implementation about to be timed (our backends and the installed
peers) against the fp64 PyTorch reference; it fails loudly (exit status 1) on any mismatch. Then every
(shape, dtype, method) problem is timed on every selected device, forward and forward+backward, all
implementations side by side in interleaved rounds; the peak memory of each forward+backward is measured,
and time is swept against batch size and query count. The table goes to stdout, and benchmark.md,
benchmark.json and PNG charts to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from rtdetrv2_kernels.backends import unavailable_reason

from . import call_cost, cases, codebases, deployment, fused, model, peers, report, selfcheck, timing, training
from .cases import PASSES, REFERENCE, SHAPES, Problem, Runner

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
GRAPH_MAX_QUERIES = 8 * 300  # batch * queries up to which GPU timing replays CUDA graphs (--cuda-graphs auto)
SWEEP_BASE = "rtdetrv2-infer-b1"
SWEEPS = {False: {"batch": [1, 2, 4, 8, 16], "queries": [100, 300, 1000, 3000]},
          True: {"batch": [1, 2], "queries": [50, 100]}}  # --quick


class Progress:
    """A one-line progress bar on a terminal, one line per step elsewhere (CI logs)."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream, self.start = total, 0, stream, time.monotonic()
        self.tty = stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        filled = int(30 * self.done / self.total)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                f"{time.monotonic() - self.start:5.0f}s  {label}")
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150) + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: one small shape per device, 3 short rounds, a small sweep")
    parser.add_argument("--shapes", nargs="+", metavar="NAME",
                        help="named shapes, or 'all' (default: a set per device); see --list")
    parser.add_argument("--list", action="store_true", help="print the named shapes and exit")
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"],
                        help="default: the CPU and, when present, the GPU")
    parser.add_argument("--backends", nargs="+", choices=list(cases.rtdetrv2_kernels.BACKENDS),
                        help="our backends to time (default: every one available on the device)")
    parser.add_argument("--no-peers", action="store_true", help=f"do not time {', '.join(peers.NAMES)}")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                        help="default: float32 on CPU; bfloat16 and float32 on CUDA")
    parser.add_argument("--methods", nargs="+", choices=list(cases.METHODS), default=list(cases.METHODS))
    parser.add_argument("--rounds", type=int, help="timing rounds per problem (default 7; --quick 3)")
    parser.add_argument("--budget", type=float,
                        help="seconds of timed calls per problem and pass (default 4; --quick 0.3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                        help=f"time GPU calls as CUDA graph replays (auto: when batch*queries <= "
                             f"{GRAPH_MAX_QUERIES})")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-sweep", action="store_true", help="skip the batch and query sweeps")
    parser.add_argument("--no-fused", action="store_true",
                        help="skip timing ms_deform_attn_fused against its eager equivalent")
    parser.add_argument("--no-call-cost", action="store_true",
                        help="skip timing the cost of a tiny call beside torch-ms-deform-attn's")
    parser.add_argument("--no-model", action="store_true",
                        help="skip timing python_model's RT-DETRv2 against transformers' end to end")
    parser.add_argument("--no-training", action="store_true",
                        help="skip timing a whole training step of python_model against transformers'")
    parser.add_argument("--no-deployment", action="store_true",
                        help="skip timing the exported detector in onnxruntime and OpenVINO (CPU)")
    parser.add_argument("--no-codebases", action="store_true",
                        help="skip timing other codebases' detectors patched onto the op (ultralytics, RF-DETR, "
                             "transformers through the kernels hub layer)")
    parser.add_argument("--codebases-only", action="store_true",
                        help="only the self-check and the other codebases' detectors (in the virtualenv that has "
                             "them: bash scripts/test_integrations.sh builds .venv-integrations)")
    parser.add_argument("--no-charts", action="store_true", help="write no PNG charts")
    parser.add_argument("--out", type=Path,
                        help="directory for benchmark.md, benchmark.json and the charts "
                             "(default: bench/results/run-<UTC date and time>)")
    args = parser.parse_args(argv)
    args.devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--devices cuda: torch sees no CUDA device")
    if args.shapes:
        unknown = [name for name in args.shapes if name not in SHAPES and name != "all"]
        if unknown:
            parser.error(f"--shapes: unknown {unknown}; known: {', '.join(SHAPES)}")
    for backend in args.backends or []:
        reasons = [f"{device}: {unavailable_reason(backend, device)}" for device in args.devices]
        if all(unavailable_reason(backend, device) for device in args.devices):
            parser.error(f"--backends {backend} is not available ({'; '.join(reasons)})")
    if args.codebases_only:
        if args.no_codebases:
            parser.error("--codebases-only and --no-codebases contradict each other")
        args.no_sweep = args.no_fused = args.no_call_cost = args.no_model = args.no_training = True
        args.no_deployment = True
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.budget = args.budget or (0.3 if args.quick else 4.0)
    return args


def problems_for(args, device: str) -> list[Problem]:
    if args.shapes:
        names = list(SHAPES) if "all" in args.shapes else args.shapes
    else:
        names = (cases.QUICK_SHAPES if args.quick else cases.DEFAULT_SHAPES)[device]
    dtypes = [DTYPES[d] for d in args.dtypes or cases.DEFAULT_DTYPES[device]]
    return [Problem(SHAPES[name], dtype, method, device) for name in names for dtype in dtypes
            for method in args.methods]


def backends_for(args, device: str) -> list[str]:
    if args.backends:
        return [b for b in args.backends if unavailable_reason(b, device) is None]
    return cases.available_backends(device)


def time_problem(problem: Problem, args, bandwidth: float | None) -> list[dict]:
    runner = Runner(problem)
    impls = cases.implementations(problem, backends_for(args, problem.device), with_peers=not args.no_peers)
    fns = {(name, pass_): runner.closure(fn, pass_) for name, fn in impls.items() for pass_ in PASSES}
    graphs = args.cuda_graphs == "on" or (
        args.cuda_graphs == "auto" and problem.shape.batch * problem.shape.queries <= GRAPH_MAX_QUERIES)
    timings = timing.measure(fns, problem.device, args.rounds, args.budget, args.threads, cuda_graphs=graphs)
    floor_s = runner.memory_floor_bytes() / bandwidth if problem.shape.floor and bandwidth else None
    rows = []
    for (name, pass_), measured in timings.items():
        seconds = measured.median
        shape = problem.shape
        row = {"shape": shape.name, "batch": shape.batch, "queries": shape.queries, "levels": shape.levels,
               "points": shape.points, "heads": shape.heads, "channels": shape.channels,
               "method": problem.method, "dtype": str(problem.dtype).replace("torch.", ""),
               "device": problem.device, "pass": pass_, "implementation": name, "ms": seconds * 1e3,
               "spread": measured.spread, "timing": measured.mode,
               "samples_ms": [s * 1e3 for s in measured.samples]}
        for other in (REFERENCE, *peers.NAMES):
            theirs = timings.get((other, pass_))
            row[f"vs {other}"] = theirs.median / seconds if theirs and other != name else None
        row["x floor"] = seconds / floor_s if floor_s and pass_ == "forward" else None
        if pass_ == "forward+backward" and not args.no_memory:
            row["peak_mib"] = timing.peak_memory(fns[(name, pass_)], problem.device) / report.MIB
        rows.append(row)
    return rows


def sweep(args, device: str, progress: Progress) -> list[dict]:
    """forward+backward time against batch size and against query count, from RT-DETRv2 inference B=1."""
    base = SHAPES[SWEEP_BASE]
    dtype = DTYPES[(args.dtypes or cases.DEFAULT_DTYPES[device])[0]]
    points = []
    for name, values in SWEEPS[args.quick].items():
        for value in values:
            shape = base.with_(name=f"{SWEEP_BASE} {name}={value}", **{name: value})
            problem = Problem(shape, dtype, "default", device)
            runner = Runner(problem)
            impls = cases.implementations(problem, backends_for(args, device), with_peers=not args.no_peers)
            fns = {impl: runner.closure(fn, "forward+backward") for impl, fn in impls.items()}
            timings = timing.measure(fns, device, rounds=3, budget_s=args.budget / 2, threads=args.threads,
                                     cuda_graphs=args.cuda_graphs == "on")
            points += [dict(sweep=name, value=value, problem=problem.label,
                            implementation=impl, ms=t.median * 1e3) for impl, t in timings.items()]
            progress.step(f"sweep {name}={value} on {device}")
    return points


def checked(failures: list[str], what: str, run, *args, **kwargs) -> list[dict]:
    """run(*args, **kwargs)'s rows; a failed agreement check (an AssertionError: two models or an exported graph
    disagree) goes to `failures` instead, so that the run goes on and exits 1 at the end."""
    try:
        return run(*args, **kwargs)
    except AssertionError as error:
        failures.append(f"{what}: {error}")
        print(f"CHECK FAILED: {what}: {error}", file=sys.stderr)
        return []


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for shape in SHAPES.values():
            print(f"{shape.name:26s} B={shape.batch:<3d} Q={shape.queries:<6d} levels={list(shape.levels)} "
                  f"points={list(shape.points)} H={shape.heads} C={shape.channels}")
        return 0
    torch.set_num_threads(args.threads)
    info = report.environment(args.threads)
    info["malloc"] = timing.pin_malloc_thresholds()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in info.items()))

    print("self-check against the fp64 reference:")
    failures = []
    for device in args.devices:
        dtypes = [DTYPES[d] for d in args.dtypes or cases.DEFAULT_DTYPES[device]]
        failures += selfcheck.self_check(device, dtypes, backends_for(args, device), with_peers=not args.no_peers)
    if failures:
        print("SELF-CHECK FAILED: these implementations disagree with the fp64 reference:\n  "
              + "\n  ".join(failures), file=sys.stderr)
        return 1

    # The optional sections this run asks for whose packages are missing here: each skipped with one line why.
    requested = {model: not args.no_model, training: not args.no_training,
                 deployment: not args.no_deployment and "cpu" in args.devices,
                 codebases: not args.no_codebases and "cpu" in args.devices}
    skipped = {section.TITLE: reason for section, wanted in requested.items()
               if wanted and (reason := section.unavailable_reason()) is not None}
    if not args.no_peers:
        skipped.update({f"peer {name}": reason for name, reason in peers.unavailable().items()})
    call_cost_devices = [] if args.no_call_cost else [d for d in args.devices if call_cost.unavailable_reason(d) is None]
    skipped.update({f"{call_cost.TITLE} on {d}": call_cost.unavailable_reason(d)
                    for d in args.devices if not args.no_call_cost and d not in call_cost_devices})
    for what, reason in skipped.items():
        print(f"skipped: {what}: {reason}")
    run_model, run_training, run_deployment, run_codebases = (wanted and section.TITLE not in skipped
                                                              for section, wanted in requested.items())
    if run_codebases:  # some of the codebases may be here without the others
        skipped.update({f"{codebases.TITLE}: {name}": reason for name, reason in codebases.missing_models().items()})

    plan = {device: [] if args.codebases_only else problems_for(args, device) for device in args.devices}
    sweep_steps = 0 if args.no_sweep else sum(len(v) for v in SWEEPS[args.quick].values()) * len(args.devices)
    fused_steps = 0 if args.no_fused else len(args.devices)
    progress = Progress(sum(len(p) for p in plan.values()) + sweep_steps + fused_steps + len(call_cost_devices)
                        + (run_model + run_training) * len(args.devices) + run_deployment + run_codebases)
    rows, scaling, fused_rows, model_rows, training_rows, deployment_rows = [], [], [], [], [], []
    codebase_rows, call_cost_rows = [], []
    for device, problems in plan.items():
        bandwidth = None
        if any(problem.shape.floor for problem in problems):
            bandwidth = timing.copy_bandwidth(device, args.threads)
            info[f"copy_bandwidth_GBps_{device}"] = round(bandwidth / 1e9, 1)
        for problem in problems:
            rows += time_problem(problem, args, bandwidth)
            progress.step(problem.label)
        if not args.no_sweep:
            scaling += sweep(args, device, progress)
        if not args.no_fused:
            dtype = DTYPES[(args.dtypes or cases.DEFAULT_DTYPES[device])[0]]
            fused_rows += fused.time_fused(device, dtype, [b for b in backends_for(args, device) if b != REFERENCE],
                                           args.rounds, args.budget, args.threads)
            progress.step(f"fused attention core on {device}")
        if device in call_cost_devices:
            call_cost_rows += call_cost.time_call_cost(device, args.rounds, args.budget, args.threads)
            progress.step(f"the cost of a call on {device}")
        if run_model:
            model_rows += checked(failures, model.TITLE, model.time_models, device, args.rounds, args.budget,
                                  args.threads, quick=args.quick)
            progress.step(f"end-to-end model on {device}")
        if run_training:
            training_rows += checked(failures, training.TITLE, training.time_training, device, args.rounds,
                                     args.budget, args.threads, quick=args.quick)
            progress.step(f"training step on {device}")
    if run_deployment:
        deployment_rows = checked(failures, deployment.TITLE, deployment.time_deployment, args.rounds, args.budget,
                                  args.threads, quick=args.quick)
        progress.step("exported detector in deployment runtimes")
    if run_codebases:
        codebase_rows = checked(failures, codebases.TITLE, codebases.time_codebases, args.rounds, args.budget,
                                args.threads, quick=args.quick)
        progress.step("other codebases' detectors, patched")

    sections = dict(fused_rows=fused_rows, call_cost_rows=call_cost_rows, model_rows=model_rows,
                    training_rows=training_rows, deployment_rows=deployment_rows, codebase_rows=codebase_rows, skipped=skipped)
    table = report.markdown(info, rows, scaling, **sections)
    print(table)
    out = args.out or report.ROOT / "bench" / "results" / time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    for path in report.write(out, info, rows, scaling, sections, charts=not args.no_charts):
        print(f"wrote {path}")
    if failures:
        print("CHECK FAILED: these results disagree with what they are compared against:\n  "
              + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0
