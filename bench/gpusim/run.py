"""Our CUDA kernels and the original Deformable-DETR kernels, side by side in GPGPU-Sim (a cycle-level GPU
simulator, PTX mode): ``python3 -m bench.gpusim`` from the repository root, with GPUSIM_PREFIX set to the
simulator's install (``bash ../shared/gpusim/setup.sh PREFIX``).

Builds bench/gpusim/driver.cu once per simulated architecture with the simulator's nvcc 11.8 (our kernels from
csrc/ itself; the original's ms_deform_im2col_cuda.cuh downloaded at run time, never committed), runs each
(config, shape, pass, implementation, method) as its own simulated process, checks every result against the
driver's double-precision host computation and ours against the original's on the same inputs, and writes
results.json (one record per run, each with the shell command that reproduces it) and results.md to --out.
Runs go two at a time (this machine's cores); each takes minutes (see bench/gpusim/README.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import os
import re
import shlex
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..shapes import SHAPES, Shape

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "bench" / "gpusim" / "driver.cu"
# The PTX each config simulates (GPGPU-Sim runs the highest PTX in a binary, whatever the config: one binary
# per architecture). SM90_H100 is a V100 model grown to H100 size, so it runs sm_70 code.
CONFIGS = {"SM86_RTX3070": 86, "SM7_QV100": 70, "SM90_H100": 70}
# What our launch policy asks of the GPU: the configs' L2 sizes (-gpgpu_cache:dl2 times memory sub-partitions)
# and SMs (-gpgpu_n_clusters).
L2_BYTES = {"SM86_RTX3070": 4 << 20, "SM7_QV100": 6 << 20, "SM90_H100": 50 << 20}
MULTIPROCESSORS = {"SM86_RTX3070": 46, "SM7_QV100": 80, "SM90_H100": 132}
# What one count of the summary's dram_rd and dram_wr moves: the config's burst length x bus width x chips per
# channel (the SM90_H100 config's HBM model moves 16 bytes a command, so a 32-byte sector counts twice).
DRAM_ATOM_BYTES = {"SM86_RTX3070": 32, "SM7_QV100": 32, "SM90_H100": 16}
# Appended to a config. The RTX 3070 config lists no latency for SHFL (the sixth value), which the simulator
# then reads from uninitialized memory (a crash, or nonsense timing); these are the other two configs' values.
CONFIG_FIXES = {"SM86_RTX3070": ["-ptx_opcode_latency_int 4,4,4,4,21,21", "-ptx_opcode_initiation_int 2,2,2,2,2,4"]}
SHAPE_NAMES = ("rtdetrv2-infer-b1", "rtdetrv2-infer-b8", "dfine-infer-b1", "deimv2-c16-infer-b1",
               "rfdetr-base-infer-b1")
PASSES = ("forward", "backward")
IMPLS = ("ours", "original")
METHODS = ("default", "discrete")
# The kernels each implementation's cycles are counted over (a backward launches one kernel in both).
KERNELS = {"ours": re.compile(r"forward_kernel|backward_kernel"), "original": re.compile(r"ms_deformable_")}
# Deformable-DETR's kernels, as transformers 4.46.3 ships them unchanged (fundamentalvision/Deformable-DETR,
# models/ops/src/cuda/ms_deform_im2col_cuda.cuh, which differs only by a final newline): a wheel on PyPI.
ORIGINAL_WHEEL = "transformers==4.46.3"
ORIGINAL_MEMBER = "transformers/kernels/deformable_detr/cuda/ms_deform_im2col_cuda.cuh"
ORIGINAL_SHA256 = "05137cfb27d21d8f0284b8a3f23165dbfcf62cbd0b1052ae545e81ca2f982c06"
# The headers it includes for its host-side launchers, of which it uses nothing: empty stand-ins.
ORIGINAL_INCLUDES = ("ATen/ATen.h", "ATen/cuda/CUDAContext.h", "THC/THCAtomics.cuh")
# GPUSIM_CACHE: where the original's source is kept (a GPU machine without network gets it carried there).
CACHE = Path(os.environ.get("GPUSIM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
             / "rtdetrv2-kernels" / "gpusim")


@dataclass(frozen=True)
class Run:
    config: str
    shape: Shape
    pass_: str
    impl: str
    method: str

    @property
    def label(self) -> str:
        return f"{self.config} {self.shape.name} {self.pass_} {self.impl} {self.method}"

    @property
    def slug(self) -> str:
        return "-".join((self.config, self.shape.name, self.pass_, self.impl, self.method))

    def driver_args(self) -> str:
        s = self.shape
        levels = ",".join(f"{h}x{w}" for h, w in s.levels)
        return (f"impl={self.impl} pass={self.pass_} method={self.method} batch={s.batch} queries={s.queries} "
                f"heads={s.heads} channels={s.channels} levels={levels} points={','.join(map(str, s.points))} "
                f"l2_bytes={L2_BYTES[self.config]} multiprocessors={MULTIPROCESSORS[self.config]}")

    def command(self) -> str:
        """The shell command, from the repository root with GPUSIM_PREFIX set, that reproduces this record."""
        return (f"python3 -m bench.gpusim --configs {self.config} --shapes {self.shape.name} --passes {self.pass_} "
                f"--impls {self.impl} --methods {self.method} --out /tmp/gpusim-{self.slug}")


def runs_for(configs, shape_names, passes, impls, methods) -> list[Run]:
    """Every requested combination the implementations can run: the original takes one point count for all
    levels and bilinear sampling only."""
    runs = []
    for config in configs:
        for name in shape_names:
            shape = SHAPES[name]
            for pass_ in passes:
                for method in methods:
                    for impl in impls:
                        if impl == "original" and (method != "default" or len(set(shape.points)) != 1):
                            continue
                        runs.append(Run(config, shape, pass_, impl, method))
    return runs


def original_source() -> Path:
    """A directory holding the original's ms_deform_im2col_cuda.cuh and stand-ins for its includes, made from
    the pinned wheel (downloaded once into the cache) and checked against its SHA-256."""
    directory = CACHE / "original"
    header = directory / "ms_deform_im2col_cuda.cuh"
    if not (header.is_file() and hashlib.sha256(header.read_bytes()).hexdigest() == ORIGINAL_SHA256):
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as download:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                            "-d", download, ORIGINAL_WHEEL], check=True)
            (wheel,) = Path(download).glob("*.whl")
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(ORIGINAL_MEMBER)
        if hashlib.sha256(data).hexdigest() != ORIGINAL_SHA256:
            raise RuntimeError(f"{ORIGINAL_WHEEL}'s {ORIGINAL_MEMBER} is not the file this harness was written for")
        header.write_bytes(data)
    for include in ORIGINAL_INCLUDES:
        stand_in = directory / "stand-ins" / include
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.touch()
    return directory


def compile_command(nvcc: list[str], output: Path, original: Path | None) -> list[str]:
    """The driver's compile command: our kernels from csrc/, shuffles in the form GPGPU-Sim executes
    (RTDETRV2_GPUSIM_SHUFFLES, see csrc/cuda/ms_deform_attn_kernels.cuh), and the original when given."""
    command = [*nvcc, "-O3", "-std=c++17", "-DRTDETRV2_GPUSIM_SHUFFLES", f"-I{ROOT / 'csrc'}"]
    if original is not None:
        command += ["-DGPUSIM_WITH_ORIGINAL", f"-I{original}", f"-I{original / 'stand-ins'}"]
    return [*command, str(DRIVER), "-o", str(output)]


def build(prefix: Path, arch: int, build_dir: Path, original: Path | None) -> Path:
    binary = build_dir / f"driver_c{arch}"
    build_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(compile_command([str(prefix / "nvcc.sh")], binary, original), capture_output=True,
                            text=True, env={**os.environ, "GPUSIM_ARCH": str(arch)})
    if result.returncode != 0:
        raise RuntimeError(f"compiling the driver for compute_{arch} failed:\n{result.stderr[-4000:]}")
    return binary


def parse_summary(text: str, kernels: re.Pattern) -> dict:
    """The per-kernel table of run_sim.sh's summary.txt, summed over the kernels matching `kernels`."""
    totals = dict(cycles=0, warp_instructions=0, thread_instructions=0, dram_reads=0, dram_writes=0, kernels=[])
    misses = {"l1d": [], "l2": []}
    row = re.compile(r"^\s*\d+\s+(\d+)\s+(\d+)\s+(\d+)\s+\S+\s+(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\S+)$")
    for line in text.splitlines():
        match = row.match(line)
        if match and kernels.search(match[8]):
            totals["cycles"] += int(match[1])
            totals["warp_instructions"] += int(match[2])
            totals["thread_instructions"] += int(match[3])
            totals["dram_reads"] += int(match[6])
            totals["dram_writes"] += int(match[7])
            totals["kernels"].append(match[8])
            for key, value in (("l1d", match[4]), ("l2", match[5])):
                if value != "n/a":
                    misses[key].append(float(value))
    if not totals["kernels"]:
        raise ValueError("no statistics for the implementation's kernels in the summary")
    totals["l1d_miss_rate"] = max(misses["l1d"], default=None)
    totals["l2_miss_rate"] = max(misses["l2"], default=None)
    return totals


def simulate(run: Run, binary: Path, prefix: Path, work: Path) -> dict:
    outdir = work / run.slug
    dump = outdir / "results.f32"
    outdir.mkdir(parents=True, exist_ok=True)
    command = [str(prefix / "run_sim.sh"), run.config, str(binary), f"{run.driver_args()} dump={dump}", str(outdir),
               *CONFIG_FIXES.get(run.config, [])]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "GPUSIM_PREFIX": str(prefix)})
    output = (outdir / "out.txt").read_text(errors="replace") if (outdir / "out.txt").is_file() else ""
    checks = {m[1]: float(m[2]) for m in re.finditer(r"^check (\S+) (\S+)$", output, re.MULTILINE)}
    record = dict(config=run.config, shape=run.shape.name, **{"pass": run.pass_}, impl=run.impl, method=run.method,
                  batch=run.shape.batch, queries=run.shape.queries, heads=run.shape.heads,
                  channels=run.shape.channels, levels=[list(level) for level in run.shape.levels],
                  points=list(run.shape.points), checks=checks, command=run.command())
    traffic = re.search(r"^traffic (\d+) (\d+)$", output, re.MULTILINE)
    if traffic:  # the driver's floor for any implementation
        record["minimum_read_bytes"], record["minimum_write_bytes"] = int(traffic[1]), int(traffic[2])
    on_edge = re.search(r"^on_cell_edge (\d+)$", output, re.MULTILINE)
    if on_edge:  # location coordinates whose gradient the check leaves out (driver.cu, kCellEdge)
        record["locations_on_cell_edge"] = int(on_edge[1])
    if completed.returncode != 0:
        record["error"] = (f"exit status {completed.returncode}: "
                           f"{(completed.stderr or output)[-1500:].strip()}")
        return record
    record.update(parse_summary((outdir / "summary.txt").read_text(), KERNELS[run.impl]))
    for direction in ("read", "write"):
        record[f"dram_{direction}_bytes"] = record[f"dram_{direction}s"] * DRAM_ATOM_BYTES[run.config]
    wall = re.search(r"^wall_s\s+(\S+)", (outdir / "summary.txt").read_text(), re.MULTILINE)
    record["simulation_wall_s"] = float(wall[1]) if wall else None
    record["dump"] = str(dump)
    return record


def source_commit() -> str:
    """The checkout's commit, "+dirty" when its sources differ from it: what a record's kernels are."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "csrc", "bench/gpusim") else "")


def read_floats(path: str) -> list[float]:
    data = Path(path).read_bytes()
    return list(struct.unpack(f"{len(data) // 4}f", data))


def compare_with_original(records: list[dict]) -> None:
    """Adds to each of our records the largest difference from the original's results on the same inputs,
    relative to the largest magnitude (both also checked against the host computation in the driver)."""
    originals = {(r["config"], r["shape"], r["pass"]): r for r in records if r["impl"] == "original" and "dump" in r}
    for record in records:
        theirs = originals.get((record["config"], record["shape"], record["pass"]))
        if record["impl"] != "ours" or record["method"] != "default" or theirs is None or "dump" not in record:
            continue
        a, b = read_floats(record["dump"]), read_floats(theirs["dump"])
        scale = max([1.0, *map(abs, b)])
        record["difference_from_original"] = max((abs(x - y) for x, y in zip(a, b)), default=0.0) / scale


def megabytes(record: dict, key: str) -> str:
    return f"{record[key] / 1e6:.2f}" if key in record else "-"


def markdown(records: list[dict]) -> str:
    lines = ["| config | shape | pass | method | ours cycles | original cycles | original / ours | ours warp insn "
             "| original warp insn | ours DRAM read MB | original DRAM read MB | least read MB (caches cold) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_key = {(r["config"], r["shape"], r["pass"], r["method"], r["impl"]): r for r in records}
    for (config, shape, pass_, method, impl), ours in by_key.items():
        if impl != "ours":
            continue
        theirs = by_key.get((config, shape, pass_, method, "original"), {})
        ratio = f"{theirs['cycles'] / ours['cycles']:.2f}" if ours.get("cycles") and theirs.get("cycles") else "-"
        lines.append(f"| {config} | {shape} | {pass_} | {method} | {ours.get('cycles', 'error')} | "
                     f"{theirs.get('cycles', '-')} | {ratio} | {ours.get('warp_instructions', '-')} | "
                     f"{theirs.get('warp_instructions', '-')} | {megabytes(ours, 'dram_read_bytes')} | "
                     f"{megabytes(theirs, 'dram_read_bytes')} | {megabytes(ours, 'minimum_read_bytes')} |")
    return "\n".join(lines) + "\n"


def hardware(args) -> int:
    """On a real GPU (bench/gpu_check.py): the same driver built with this machine's nvcc for its GPU (the
    shuffle intrinsic, as the op's build), ours and the original timed over `repeat` launches each with CUDA
    events, after the checked launch; records as the simulation's with the GPU's name as config and time_ms."""
    query = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    name, capability = subprocess.run(query, capture_output=True, text=True, check=True).stdout.splitlines()[0].split(", ")
    arch = capability.replace(".", "")
    nvcc = os.environ.get("NVCC") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    out = args.out or ROOT / "bench" / "results" / f"gpu-original-{datetime.date.today().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    binary = Path(tempfile.mkdtemp()) / "driver"
    command = compile_command([nvcc, f"-arch=sm_{arch}"], binary, original_source())
    command.remove("-DRTDETRV2_GPUSIM_SHUFFLES")
    subprocess.run(command, check=True)
    records = []
    for run in runs_for([list(CONFIGS)[0]], args.shapes, args.passes, args.impls, args.methods):
        # Without them the driver asks the GPU for its L2 size and SMs.
        arguments = [a for a in run.driver_args().split() if not a.startswith(("l2_bytes=", "multiprocessors="))]
        result = subprocess.run([str(binary), *arguments, "repeat=20"], capture_output=True, text=True)
        checks = {m[1]: float(m[2]) for m in re.finditer(r"^check (\S+) (\S+)$", result.stdout, re.MULTILINE)}
        time_ms = re.search(r"^time_ms (\S+)$", result.stdout, re.MULTILINE)
        record = dict(config=name, shape=run.shape.name, **{"pass": run.pass_}, impl=run.impl, method=run.method,
                      checks=checks, time_ms=float(time_ms[1]) if time_ms else None, commit=source_commit())
        if result.returncode != 0:
            record["error"] = (result.stderr or result.stdout)[-1500:].strip()
        records.append(record)
        print(f"{name} {run.shape.name} {run.pass_} {run.impl} {run.method}: "
              f"{record['time_ms']} ms, checks {checks}{' ' + record['error'] if 'error' in record else ''}")
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    return 1 if any("error" in r or any(not e <= 1e-4 for e in r["checks"].values()) for r in records) else 0


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpusim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPE_NAMES), metavar="SHAPE",
                        help=f"named shapes (python -m bench --list; default: {' '.join(SHAPE_NAMES)})")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--jobs", type=int, default=2, help="simulations at once (default 2: one per core here)")
    parser.add_argument("--out", type=Path, help="default: bench/results/gpusim-<UTC date>")
    parser.add_argument("--prefix", type=Path, default=os.environ.get("GPUSIM_PREFIX"),
                        help="the simulator's install (default: $GPUSIM_PREFIX)")
    parser.add_argument("--hardware", action="store_true",
                        help="no simulator: time ours and the original on this machine's GPU (bench/gpu_check.py)")
    parser.add_argument("--fetch-original", action="store_true",
                        help="only download the original's source into the cache ($GPUSIM_CACHE) and exit")
    args = parser.parse_args(argv)
    if args.hardware or args.fetch_original:
        return args
    if args.prefix is None or not (args.prefix / "env.sh").is_file():
        parser.error("set GPUSIM_PREFIX (or --prefix) to the PREFIX of `bash ../shared/gpusim/setup.sh PREFIX`")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fetch_original:
        print(original_source())
        return 0
    if args.hardware:
        return hardware(args)
    out = args.out or ROOT / "bench" / "results" / f"gpusim-{datetime.date.today().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    work = CACHE / "runs" / out.resolve().as_posix().strip("/").replace("/", "_")  # the simulator's scratch files
    runs = runs_for(args.configs, args.shapes, args.passes, args.impls, args.methods)
    original = original_source() if any(run.impl == "original" for run in runs) else None
    binaries = {arch: build(args.prefix, arch, work / "build", original)
                for arch in sorted({CONFIGS[run.config] for run in runs})}
    print(f"{len(runs)} simulations, {args.jobs} at a time", file=sys.stderr)
    records = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(simulate, run, binaries[CONFIGS[run.config]], args.prefix, work): run for run in runs}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            record = future.result()
            records.append(record)
            status = record.get("error") or f"{record['cycles']} cycles, checks {record['checks']}"
            print(f"[{done}/{len(runs)}] {futures[future].label}: {status}", file=sys.stderr)
    commit = source_commit()
    for record in records:
        record["commit"] = commit
    order = {run.slug: i for i, run in enumerate(runs)}
    records.sort(key=lambda r: order["-".join((r["config"], r["shape"], r["pass"], r["impl"], r["method"]))])
    compare_with_original(records)
    for record in records:
        record.pop("dump", None)
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    table = markdown(records)
    (out / "results.md").write_text(table)
    print(table)
    for record in records:
        print(f"{record['config']} {record['shape']} {record['pass']} {record['impl']} {record['method']}: "
              f"{record.get('cycles', 'error')} cycles")
    failed = [r for r in records if "error" in r or any(not e <= 1e-4 for e in r["checks"].values())
              or not r.get("difference_from_original", 0) <= 1e-4]
    for record in failed:
        print(f"FAILED: {record['command']}: {record.get('error') or record['checks']}", file=sys.stderr)
    return 1 if failed else 0
