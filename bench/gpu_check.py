"""The GPU check: everything a GPU machine should verify, in one call of at most 9 minutes by construction.

    python bench/gpu_check.py [--out DIR] [--budget SECONDS] [--steps NAME ...] [--rehearse]

Steps, in order of value, each with its own time limit (never more than what is left of --budget):
build for the present GPU only, assert that the "cuda" and "triton" backends exist (a build without nvcc
would otherwise pass and every GPU test skip), the GPU tests of those backends (Triton in single-
configuration mode: no autotuning), the benchmark of the named inference and training shapes (fp32 and
bf16, against the PyTorch path and torch-ms-deform-attn when installed, or built from PEER_SDIST),
compute-sanitizer memcheck of one small case per kernel (PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that the
caching allocator hides no out-of-bounds access), the end-to-end model, a whole training step of it
against transformers' (batch 16, 640x640, bf16; skipped, saying why, without scipy for the matching), and the
original Deformable-DETR kernels timed beside ours at RT-DETRv2's decoder shapes (the GPU simulation's peer,
so that the simulation can be held against hardware). The report (gpu_check.md, gpu_check.json and each step's log) is rewritten after every step, so a call cut short
still returns what finished. Exits non-zero if a step failed or ran out of time.

--rehearse runs the same logic without a GPU (arguments, budgets, report writing), reporting the GPU steps
as not run; CI runs it so that the script cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The inference and training shapes of README's GPU table.
BENCH_SHAPES = ["rtdetrv2-infer-b1", "rtdetrv2-infer-b8", "rtdetrv2-train-b16-640"]
KERNEL_TESTS = ["tests/op/test_kernels.py", "tests/op/test_fused.py", "tests/op/test_op_cases.py",
                "tests/op/test_deterministic.py", "tests/op/test_registration.py"]
# One small case per kernel (plain and fused, both methods, forward and backward, the deterministic path).
# The model and training-step sections of `python -m bench` alone (its self-check needs one shape).
MODEL_ONLY = ["--shapes", "rtdetrv2-infer-b1", "--dtypes", "float32", "--budget", "0.3", "--rounds", "3", "--no-sweep",
              "--no-fused", "--no-charts", "--no-memory"]
MEMCHECK_TESTS = ["tests/op/test_kernels.py::test_matches_reference", "tests/op/test_fused.py::test_empty_and_nonfinite",
                  "tests/op/test_deterministic.py::test_cuda_deterministic_fused_backward_repeats_bitwise_and_matches_the_default_mode"]


@dataclasses.dataclass
class Step:
    name: str
    budget: float  # seconds at most
    command: list[str]
    gpu: bool = True  # needs a GPU (not run when rehearsing)
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def python() -> str:
    return sys.executable


def present_gpu_arch() -> str:
    """TORCH_CUDA_ARCH_LIST for this machine's GPU (the build's default holds five architectures)."""
    code = "import torch; print('%d.%d' % torch.cuda.get_device_capability())"
    run = subprocess.run([python(), "-c", code], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else ""


def steps(out: Path, arch: str) -> list[Step]:
    pytest_gpu = [python(), "-m", "pytest", "-q", "-ra", "-m", "not slow", "-p", "no:cacheprovider"]
    test_env = {"RTDETRV2_SKIP_EMULATION": "1", "RTDETRV2_TRITON_AUTOTUNE": "0"}
    return [
        # Editable: `python -m bench` runs from the checkout, so the checkout must hold the build.
        Step("build", 130, [python(), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
             env={"MAX_JOBS": str(os.cpu_count() or 4), "TORCH_CUDA_ARCH_LIST": arch}),
        # With PEER_SDIST=path/to/torch_ms_deform_attn-*.tar.gz (no network there) the peer is built and timed.
        *([Step("build-peer", 60, [python(), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                                   os.environ["PEER_SDIST"]])] if os.environ.get("PEER_SDIST") else []),
        Step("backends", 20, [python(), "-c", "import rtdetrv2_kernels as rk, sys; b = rk.available_backends(); "
                                              "print('backends:', b); sys.exit(0 if {'cuda', 'triton'} <= set(b) "
                                              "else 'cuda or triton is missing: the GPU tests would only skip')"]),
        Step("tests", 120, [*pytest_gpu, "-k", "cuda or triton", *KERNEL_TESTS], env=test_env),
        Step("benchmark", 80, [python(), "-m", "bench", "--devices", "cuda", "--shapes", *BENCH_SHAPES,
                               "--dtypes", "float32", "bfloat16", "--budget", "0.5", "--rounds", "3", "--no-sweep",
                               "--no-model", "--no-training", "--no-charts", "--out", str(out / "benchmark")]),
        Step("memcheck", 70, ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9", *pytest_gpu, "-x",
                              "-k", "cuda and not emulated", *MEMCHECK_TESTS],
             env={**test_env, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
        Step("model", 30, [python(), "-m", "bench", "--devices", "cuda", *MODEL_ONLY, "--no-training",
                           "--out", str(out / "model")]),
        # Without scipy (the matching) the benchmark skips this section, saying so.
        Step("training", 30, [python(), "-m", "bench", "--devices", "cuda", *MODEL_ONLY, "--no-model",
                              "--out", str(out / "training")]),
        # The simulation's peer on hardware: the original Deformable-DETR kernels beside ours, timed by the
        # simulation harness's own driver (bench/gpusim/). Its source comes from GPUSIM_CACHE, which a machine
        # without network gets carried (`GPUSIM_CACHE=bench/gpusim/.cache python3 -m bench.gpusim --fetch-original`).
        Step("original", 60, [python(), "-m", "bench.gpusim", "--hardware", "--shapes", "rtdetrv2-infer-b1",
                              "rtdetrv2-infer-b8", "--methods", "default", "--out", str(out / "original")],
             env={"GPUSIM_CACHE": str(REPO / "bench" / "gpusim" / ".cache")}),
    ]


def gpu_description() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "none found"


def versions() -> str:
    code = "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}')"
    run = subprocess.run([python(), "-c", code], capture_output=True, text=True)
    return run.stdout.strip() or (run.stderr.strip().splitlines() or ["unknown"])[-1]


def write_report(out: Path, header: dict, results: list[dict]) -> None:
    (out / "gpu_check.json").write_text(json.dumps({**header, "steps": results}, indent=2) + "\n")
    lines = ["# GPU check", ""] + [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "| step | result | seconds | budget |", "|---|---|---:|---:|"]
    lines += [f"| {r['step']} | {r['result']} | {r['seconds']:.0f} | {r['budget']:.0f} |" for r in results]
    benchmark = out / "benchmark" / "benchmark.md"
    if benchmark.is_file():
        lines += ["", benchmark.read_text()]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def run_step(step: Step, limit: float, out: Path, rehearse: bool) -> dict:
    result = {"step": step.name, "budget": step.budget, "limit": round(limit, 1), "seconds": 0.0}
    if rehearse and step.gpu:
        return {**result, "result": "not run (rehearsal: no GPU)"}
    if limit < 5:
        return {**result, "result": "not run (out of time)"}
    log = out / f"{step.name}.log"
    start = time.monotonic()
    with log.open("w") as stream:
        try:
            code = subprocess.run(step.command, cwd=REPO, env={**os.environ, **step.env}, stdout=stream,
                                  stderr=subprocess.STDOUT, timeout=limit).returncode
            outcome = "ok" if code == 0 else f"FAILED (exit {code})"
        except subprocess.TimeoutExpired:
            outcome = f"FAILED (over its {limit:.0f} s)"
        except OSError as error:
            outcome = f"FAILED ({error})"
    return {**result, "result": outcome, "seconds": round(time.monotonic() - start, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="report directory (default: bench/results/gpu-<UTC date>)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all steps together (default 540)")
    parser.add_argument("--steps", nargs="+", help="run only these steps, in the usual order")
    parser.add_argument("--rehearse", action="store_true", help="no GPU: run the logic, report GPU steps as not run")
    args = parser.parse_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    out = (args.out or REPO / "bench" / "results" / f"gpu-{now:%Y%m%d-%H%M}").resolve()
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or ("" if args.rehearse else present_gpu_arch())
    plan = steps(out, arch)
    known = [s.name for s in plan]
    if args.steps:
        unknown = sorted(set(args.steps) - set(known))
        if unknown:
            parser.error(f"--steps: unknown {unknown}; known: {known}")
        plan = [s for s in plan if s.name in args.steps]
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    header = {"date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": commit, "gpu": gpu_description(),
              "versions": versions(), "budget": f"{args.budget:.0f} s"}
    if args.rehearse:
        header["mode"] = "rehearsal (no GPU steps run)"
    deadline = time.monotonic() + args.budget
    results: list[dict] = []
    for step in plan:
        limit = min(step.budget, deadline - time.monotonic())
        print(f"== {step.name} (at most {max(limit, 0):.0f} s)", flush=True)
        results.append(run_step(step, limit, out, args.rehearse))
        print(f"   {results[-1]['result']} in {results[-1]['seconds']:.0f} s", flush=True)
        write_report(out, header, results)
    print((out / "gpu_check.md").read_text())
    return 0 if all(r["result"] == "ok" or r["result"].startswith("not run (rehearsal") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
