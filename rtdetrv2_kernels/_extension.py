"""Finding and loading the compiled C++ kernels.

A binary is only ever loaded when it was built against the torch that is running: ``setup.py`` writes the
torch version next to each library it builds (``_C.torch_version``). Without such a binary (for example
after a plain ``pip install .``, whose isolated build environment has no torch) the sources that ship inside
the package are compiled on first use with ninja and cached by ``torch.utils.cpp_extension``.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import torch

from ._build_config import (
    ARCHS_SUFFIX,
    CXX_FLAGS,
    LIBRARIES,
    LINK_FLAGS,
    NVCC_FLAGS,
    STAMP_SUFFIX,
    cuda_include_dirs,
    cuda_unavailable_reason,
    is_cuda_library,
    torch_build_tag,
)

_PACKAGE_DIR = Path(__file__).resolve().parent

_lock = threading.RLock()  # loading _C_cuda loads _C first
_status: dict[str, str | None] = {}  # library name -> None when loaded, else why it could not be


def source_dir() -> Path:
    """csrc/ as installed inside the package, or at the repository root when running from a checkout."""
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if (candidate / "sampling.h").is_file():
            return candidate
    raise FileNotFoundError(f"the C++ sources (csrc/) are missing from {_PACKAGE_DIR}")


def _prebuilt_path(name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _PACKAGE_DIR / f"{name}{suffix}"
        if path.is_file():
            stamp = _PACKAGE_DIR / f"{name}{STAMP_SUFFIX}"
            if stamp.is_file() and stamp.read_text().strip() == torch_build_tag():
                return path
    return None


def _ensure_ninja_on_path() -> None:
    # torch.utils.cpp_extension runs `ninja`; the ninja wheel puts it in the venv's bin/, which is not on
    # PATH when the venv's python is called without activating it.
    if shutil.which("ninja") is None:
        try:
            import ninja  # type: ignore[import-not-found]

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def _jit_cache_exists(jit_name: str) -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(jit_name, verbose=False)) / f"{jit_name}.so").is_file()
    except Exception:  # a private helper of torch: if it moves, only the message changes
        return False


def _jit_compile(name: str) -> None:
    from torch.utils import cpp_extension

    src = source_dir()
    include_dirs = [str(src)]
    if is_cuda_library(name):
        reason = cuda_unavailable_reason()
        if reason:
            raise RuntimeError(f"cannot compile the CUDA kernels: {reason}")
        include_dirs += cuda_include_dirs()
    _ensure_ninja_on_path()
    jit_name = "rtdetrv2_kernels" + name + "_torch" + re.sub(r"\W", "_", torch_build_tag())
    if not _jit_cache_exists(jit_name):
        print(
            f"rtdetrv2_kernels: compiling the C++ kernels ({name}) for torch {torch_build_tag()}; this happens "
            "once, the result is cached by torch.utils.cpp_extension (TORCH_EXTENSIONS_DIR)",
            file=sys.stderr,
        )
    cpp_extension.load(
        name=jit_name,
        sources=[str(src / f) for f in LIBRARIES[name]],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        extra_ldflags=LINK_FLAGS,
        extra_include_paths=include_dirs,
        is_python_module=False,
        verbose=False,
    )


def cuda_archs(name: str = "_C_cuda") -> str | None:
    """The TORCH_CUDA_ARCH_LIST a prebuilt CUDA library was built for, or None where it is not recorded (a
    build at first use, which compiles for the GPUs present)."""
    path = _PACKAGE_DIR / f"{name}{ARCHS_SUFFIX}"
    if os.environ.get("RTDETRV2_KERNELS_FORCE_JIT") == "1" or not path.is_file() or not _prebuilt_path(name):
        return None
    return path.read_text().strip()


def is_loaded(name: str) -> bool:
    """Whether library `name` has been loaded in this process (without trying to load it)."""
    return _status.get(name, "not tried") is None


def load(name: str) -> str | None:
    """Loads library `name` once per process; returns None on success, else the reason it is unavailable."""
    with _lock:
        if name in _status:
            return _status[name]
        reason = None
        if name != "_C" and (base_reason := load("_C")) is not None:
            _status[name] = f"the library defining the ops could not be loaded ({base_reason})"
            return _status[name]
        try:
            if os.environ.get("RTDETRV2_KERNELS_FORCE_JIT") != "1" and (path := _prebuilt_path(name)):
                torch.ops.load_library(str(path))
            else:
                _jit_compile(name)
            from . import _registration  # noqa: F401  (fake kernels and autograd for the loaded ops)
        except Exception as error:  # a missing compiler, a failed build, a bad binary: all mean "unavailable"
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            reason = f"{type(error).__name__}: {first_line[:300]}"
        _status[name] = reason
        return reason
