"""The GPU simulation harness (bench/gpusim/) cannot rot between simulation runs, which are too slow for CI:
its driver compiles against csrc/ with the machine's nvcc (and the simulator's nvcc 11.8 when
GPUSIM_PREFIX is set), the shuffles it simulates have the form GPGPU-Sim executes, and the runner's
parsing and records are right."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _nvccs():
    found = []
    machine = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)
    if machine:
        # compute_75: the oldest architecture nvcc 13 targets (and the oldest the package builds for).
        found.append(pytest.param([machine], {}, "compute_75", id="machine-nvcc"))
    prefix = os.environ.get("GPUSIM_PREFIX")
    if prefix and (Path(prefix) / "nvcc.sh").is_file():
        # compute_70: what the SM7_QV100 and SM90_H100 configs simulate.
        found.append(pytest.param([str(Path(prefix) / "nvcc.sh")], {}, "compute_70", id="simulator-nvcc-11.8"))
    return found or [pytest.param(None, None, None, id="no-nvcc")]


@pytest.fixture(scope="module")
def gpusim():
    import sys

    sys.path.insert(0, str(ROOT))
    try:
        from bench.gpusim import run
    finally:
        sys.path.remove(str(ROOT))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("nvcc, env, arch", _nvccs())
def test_the_driver_compiles_our_kernels_with_shuffles_the_simulator_runs(gpusim, nvcc, env, arch, tmp_path):
    if nvcc is None:
        pytest.skip("no nvcc here (neither on PATH nor /usr/local/cuda) and GPUSIM_PREFIX is not set")
    ptx = tmp_path / "driver.ptx"
    command = gpusim.compile_command(nvcc, ptx, original=None)
    # PTX only: no CUDA runtime of the simulator's version needed.
    command = command[:-2] + ["-ptx", f"-arch={arch}", "-o", str(ptx)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = ptx.read_text()
    shuffles = re.findall(r"shfl\.sync\.bfly\.b32\s+([^,]+),", text)
    assert shuffles, "the backward's group sums should use warp shuffles"
    # GPGPU-Sim 4.2 mis-executes the form with a predicate destination ("%r1|%p1").
    assert not any("|" in destination for destination in shuffles), shuffles[:3]
    assert re.search(r"\.entry .*forward_kernel", text) and re.search(r"\.entry .*backward_kernel", text)


SUMMARY = """\
per kernel (counters are this kernel only; L1D/L2 = miss rates):
  k      cycles   warp_insn   thread_insn    IPC     L1D      L2    dram_rd    dram_wr  kernel
  1       31958     1274476      38742432 1212.3  0.6120  0.4391     133393          0  _ZN16rtdetrv2_kernels14forward_kernelIfLi4ELi1ELb0E
  2         900        1000         32000   10.0     n/a     n/a          0         12  _Z6memsetv
"""


def test_summary_parsing_counts_only_the_implementations_kernels(gpusim):
    record = gpusim.parse_summary(SUMMARY, gpusim.KERNELS["ours"])
    assert (record["cycles"], record["warp_instructions"], record["dram_reads"]) == (31958, 1274476, 133393)
    assert record["l1d_miss_rate"] == 0.612 and record["l2_miss_rate"] == 0.4391
    with pytest.raises(ValueError, match="no statistics"):
        gpusim.parse_summary(SUMMARY, gpusim.KERNELS["original"])


def test_runs_leave_out_what_the_original_cannot_run_and_each_command_reproduces_its_run(gpusim, tmp_path):
    runs = gpusim.runs_for(["SM7_QV100"], ["rtdetrv2-infer-b1", "dfine-infer-b1"], ["forward"], ["ours", "original"],
                           ["default", "discrete"])
    labels = {(r.shape.name, r.impl, r.method) for r in runs}
    assert labels == {("rtdetrv2-infer-b1", "ours", "default"), ("rtdetrv2-infer-b1", "original", "default"),
                      ("rtdetrv2-infer-b1", "ours", "discrete"), ("dfine-infer-b1", "ours", "default"),
                      ("dfine-infer-b1", "ours", "discrete")}
    (tmp_path / "env.sh").touch()  # a stand-in for the simulator's PREFIX
    for run in runs:
        argv = run.command().split()
        assert argv[:3] == ["python3", "-m", "bench.gpusim"]
        args = gpusim.parse_args([*argv[3:], "--prefix", str(tmp_path)])
        assert gpusim.runs_for(args.configs, args.shapes, args.passes, args.impls, args.methods) == [run]
    assert "levels=80x80,40x40,20x20" in runs[0].driver_args() and "points=4,4,4" in runs[0].driver_args()
