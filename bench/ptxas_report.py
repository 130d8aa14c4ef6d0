"""Registers, shared memory, stack and spills of every CUDA kernel, from ptxas's report.

    python bench/ptxas_report.py [--arch 90] [--check]

Compiles the CUDA sources with setup.py's flags (no GPU needed) and `-Xptxas -v`, and prints one row per
kernel. With --check, exits non-zero if a fast-path kernel (16-byte vector width) spills or uses a stack
frame: those must live in registers. The test suite runs it with --check wherever nvcc is present.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "rtdetrv2_kernels"))
import _build_config  # noqa: E402  (torch-free module; avoids importing the package)

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USAGE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def compile_with_report(arch: str) -> str:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import CUDA_HOME, include_paths

    includes = [str(ROOT / "csrc"), *include_paths(device_type="cuda"), *_build_config.cuda_include_dirs()]
    sources = [s for s in _build_config.LIBRARIES["_C_cuda"] if s.endswith(".cu")]
    report = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources:
            command = [
                str(Path(CUDA_HOME) / "bin" / "nvcc"), "-c", str(ROOT / "csrc" / source), "-o", f"{tmp}/kernel.o",
                "-std=c++20", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                "-DTORCH_API_INCLUDE_EXTENSION_H", "-D_GLIBCXX_USE_CXX11_ABI=1", *_build_config.NVCC_FLAGS,
                *(f"-I{path}" for path in includes),
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"nvcc failed:\n{result.stderr[-4000:]}")
            report.append(result.stderr)
    return "\n".join(report)


def parse(report: str) -> list[dict]:
    kernels, current = [], None
    for line in report.splitlines():
        if match := ENTRY.search(line):
            current = dict(mangled=match.group(1), arch=match.group(2), stack=0, spill_stores=0, spill_loads=0,
                           registers=0, smem=0)
            kernels.append(current)
        elif current and (match := FRAME.search(line)):
            current.update(stack=int(match[1]), spill_stores=int(match[2]), spill_loads=int(match[3]))
        elif current and (match := USAGE.search(line)):
            current.update(registers=int(match[1]), smem=int(match[2] or 0))
    names = subprocess.run(["c++filt"], input="\n".join(k["mangled"] for k in kernels), capture_output=True,
                           text=True).stdout.splitlines()
    for kernel, name in zip(kernels, names):
        kernel["name"] = re.sub(r"^void |rtdetrv2_kernels::(\(anonymous namespace\)::)?", "", name).split("(")[0]
    return kernels


def is_fast_path(name: str) -> bool:
    """Kernels instantiated with the 16-byte vector width (VEC = 16 / sizeof(scalar))."""
    match = re.search(r"<(float|double|c10::Half|c10::BFloat16), (\d+)", name)
    if not match:
        return False
    size = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2}[match[1]]
    return int(match[2]) == 16 // size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    parser.add_argument("--check", action="store_true", help="fail if a fast-path kernel spills")
    args = parser.parse_args()
    reason = _build_config.cuda_unavailable_reason()
    if reason:
        print(f"ptxas report skipped: {reason}")
        return 0
    kernels = parse(compile_with_report(args.arch))
    if not kernels:
        print("no kernels found in the ptxas report")
        return 1
    print("| kernel | arch | registers | smem | stack | spill stores | spill loads |\n|---|---|---:|---:|---:|---:|---:|")
    bad = []
    for k in kernels:
        print(f"| {k['name']} | {k['arch']} | {k['registers']} | {k['smem']} | {k['stack']} | {k['spill_stores']} "
              f"| {k['spill_loads']} |")
        if is_fast_path(k["name"]) and (k["stack"] or k["spill_stores"] or k["spill_loads"]):
            bad.append(k["name"])
    if args.check and bad:
        print("fast-path kernels with spills or a stack frame:\n  " + "\n  ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
