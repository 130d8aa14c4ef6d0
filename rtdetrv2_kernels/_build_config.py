"""What the C++/CUDA libraries are built from and with. Shared by setup.py (ahead-of-time builds, where
torch may be absent) and _extension.py (builds at first use), so it must not import torch at module level."""

from __future__ import annotations

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
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
# Ampere, Ada and Hopper, plus PTX that newer GPUs compile at load time.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# setup.py writes the torch a library was built against into "<name>.torch_version" beside it.
STAMP_SUFFIX = ".torch_version"


def is_cuda_library(name: str) -> bool:
    return any(source.endswith(".cu") for source in LIBRARIES[name])


def torch_build_tag() -> str:
    """Identifies the torch build a binary must match to be loaded."""
    import torch

    return f"{torch.__version__}+cuda{torch.version.cuda}" if torch.version.cuda else torch.__version__


def cuda_unavailable_reason() -> str | None:
    """None when CUDA sources can be compiled here (a CUDA build of torch and nvcc), else why not."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "no CUDA toolkit (nvcc) was found; set CUDA_HOME to the toolkit's root"
    if not any(any((Path(CUDA_HOME) / lib).glob("libcudart.so*")) for lib in ("lib64", "lib")):
        return f"CUDA_HOME={CUDA_HOME} has no lib64/libcudart.so; set CUDA_HOME to the toolkit's root"
    return None


def cuda_include_dirs() -> list[str]:
    """Headers that torch's CUDA headers include (cusparse.h, cublas_v2.h, ...) but a minimal toolkit may
    lack: taken from the nvidia-* wheels installed with torch."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if (Path(CUDA_HOME) / "include" / "cusparse.h").exists():
        return []
    wheels = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return sorted(str(d) for d in wheels.glob("*/include"))
