"""What the C++/CUDA libraries are built from and with. Shared by setup.py (ahead-of-time builds, where
torch may be absent) and _extension.py (builds at first use), so it must not import torch at module level."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

# Library name -> source files, relative to csrc/. _C defines the op schemas and the CPU kernels; _C_cuda
# adds the CUDA kernels to those ops and is built only where a CUDA toolkit and a CUDA build of torch are.
LIBRARIES = {
    "_C": ["ms_deform_attn.cpp", "cpu/ms_deform_attn_cpu.cpp", "cpu/buffer_pool.cpp"],
    "_C_cuda": ["cuda/ms_deform_attn_cuda.cu"],
}
# -fopenmp: ATen's parallel_for is an inline OpenMP region; without it every kernel runs on one thread.
CXX_FLAGS = ["-O3", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
# --threads=0: one nvcc thread per architecture, up to the machine's cores (the architectures compile one after
# another otherwise).
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "--threads=0"]
# Turing (the T4, on which RT-DETR, D-FINE and DEIM publish their latencies), Ampere, Ada and Hopper, plus
# PTX that newer GPUs compile at load time.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"
# setup.py writes the torch a library was built against into "<name>.torch_version" beside it, and for the
# CUDA library the architectures it holds into "<name>.cuda_archs".
STAMP_SUFFIX = ".torch_version"
ARCHS_SUFFIX = ".cuda_archs"


def is_cuda_library(name: str) -> bool:
    return any(source.endswith(".cu") for source in LIBRARIES[name])


def torch_build_tag() -> str:
    """Identifies the torch build a binary must match to be loaded."""
    import torch

    return f"{torch.__version__}+cuda{torch.version.cuda}" if torch.version.cuda else torch.__version__


# Where toolkits keep libcudart: NVIDIA's layout, and Debian's (CUDA_HOME=/usr).
CUDART_DIRS = ("lib64", "lib", "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu")


def nvcc_release(nvcc: Path) -> str | None:
    """The CUDA release ("13.0") that `nvcc --version` reports, or None."""
    try:
        output = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", output)
    return f"{match[1]}.{match[2]}" if match else None


def cuda_unavailable_reason() -> str | None:
    """None when CUDA sources can be compiled here (a CUDA build of torch and an nvcc of its CUDA major
    version, which torch's build requires), else why not."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("RTDETRV2_BUILD_CUDA") == "0":
        return "RTDETRV2_BUILD_CUDA=0 is set (scripts/bench.sh sets it where no GPU is present)"
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    nvcc = Path(CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
    if CUDA_HOME is None or not nvcc.exists():
        return "no CUDA toolkit (nvcc) was found; set CUDA_HOME to the toolkit's root"
    if not any(any((Path(CUDA_HOME) / lib).glob("libcudart.so*")) for lib in CUDART_DIRS):
        return (f"CUDA_HOME={CUDA_HOME} has no lib64/libcudart.so (nor {', '.join(CUDART_DIRS[1:])}); set "
                "CUDA_HOME to the toolkit's root")
    release = nvcc_release(nvcc)
    if release is None:
        return f"{nvcc} --version does not say which CUDA release it is"
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"nvcc ({nvcc}) is CUDA {release} but this torch was built with CUDA {torch.version.cuda}, and "
                "torch's extension build refuses a different major version; install a CUDA "
                f"{torch.version.cuda.split('.')[0]}.x toolkit and set CUDA_HOME to it")
    return None


def runs_on(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether a binary built for TORCH_CUDA_ARCH_LIST-style `arch_list` ("7.5;8.0;9.0+PTX") runs on a GPU of
    compute `capability`: machine code for the same major version and an equal or lower minor one, or PTX
    for an equal or lower version (compiled by the driver at load time)."""
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        version, _, ptx = entry.partition("+")
        major, minor = (int(x) for x in version.split("."))
        if (major == capability[0] and minor <= capability[1]) or (ptx and (major, minor) <= tuple(capability)):
            return True
    return False


def cuda_include_dirs() -> list[str]:
    """Headers that torch's CUDA headers include (cusparse.h, cublas_v2.h, ...) but a minimal toolkit may
    lack: taken from the nvidia-* wheels installed with torch."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if (Path(CUDA_HOME) / "include" / "cusparse.h").exists():
        return []
    wheels = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return sorted(str(d) for d in wheels.glob("*/include"))
