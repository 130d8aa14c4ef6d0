"""What the C++ libraries are built from and with. Shared by setup.py (ahead-of-time builds, where torch may
be absent) and _extension.py (builds at first use), so it must not import torch at module level."""

from __future__ import annotations

# Library name -> source files, relative to csrc/.
LIBRARIES = {
    "_C": ["ms_deform_attn.cpp", "cpu/ms_deform_attn_cpu.cpp"],
}
# -fopenmp: ATen's parallel_for is an inline OpenMP region; without it every kernel runs on one thread.
CXX_FLAGS = ["-O3", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
# setup.py writes the torch a library was built against into "<name>.torch_version" beside it.
STAMP_SUFFIX = ".torch_version"


def torch_build_tag() -> str:
    """Identifies the torch build a binary must match to be loaded."""
    import torch

    return f"{torch.__version__}+cuda{torch.version.cuda}" if torch.version.cuda else torch.__version__
