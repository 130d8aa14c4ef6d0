"""The CUDA kernels of csrc/cuda/, compiled by g++ against an emulation of CUDA and run on CPU tensors.

Test tooling, not part of the package: it makes the CUDA sources execute (and be checked) without a GPU.

    import emulated_cuda
    ops = emulated_cuda.load(90)   # torch.ops.rtdetrv2_kernels_emulated_sm90, built on first use and cached

The ops take exactly the arguments of the torch.ops.rtdetrv2_kernels ops of the same names; their
fake kernels and autograd are registered as for those, and each build is also a backend of ms_deform_attn
named "cuda-emulated-sm80" / "cuda-emulated-sm90" (on CPU tensors). RTDETRV2_EMULATION_SANITIZE=address
builds with AddressSanitizer and UndefinedBehaviorSanitizer (the process must preload libasan, see
asan_preload()). RTDETRV2_EMULATION_ARCHS (e.g. "90") selects the builds the test suite uses (default: all of
ARCHS). What the emulation checks, and what it cannot: docs/semantics.md, "Backends".
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ARCHS = (80, 90)
SANITIZE_ENV = "RTDETRV2_EMULATION_SANITIZE"
ARCHS_ENV = "RTDETRV2_EMULATION_ARCHS"
SOURCES = ("emulated_kernels.cpp", "emulation.cpp")
BASE_FLAGS = ["-std=c++20", "-DRTDETRV2_CUDA_EMULATION", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
# UBSan's vptr check compares type_info across libraries, which torch's do not share; float-cast-overflow
# is not part of "undefined" in GCC and is what catches an out-of-range float-to-int conversion.
SANITIZER_FLAGS = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize=vptr",
                   "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def backend_name(arch: int) -> str:
    return f"cuda-emulated-sm{arch}"


def namespace(arch: int) -> str:
    return f"rtdetrv2_kernels_emulated_sm{arch}"


def sanitizer() -> str | None:
    value = os.environ.get(SANITIZE_ENV) or None
    if value not in (None, "address"):
        raise ValueError(f"{SANITIZE_ENV} must be unset or 'address', got {value!r}")
    return value


def selected_archs() -> tuple[int, ...]:
    """The archs named by RTDETRV2_EMULATION_ARCHS (a comma-separated list), or all of ARCHS."""
    value = os.environ.get(ARCHS_ENV, "").strip()
    if not value:
        return ARCHS
    names = [name.strip() for name in value.split(",")]
    if any(name not in {str(arch) for arch in ARCHS} for name in names) or len(set(names)) != len(names):
        raise ValueError(f"{ARCHS_ENV} must be a comma-separated list of distinct archs out of "
                         f"{','.join(map(str, ARCHS))}, got {value!r}")
    return tuple(sorted(int(name) for name in names))


def asan_preload() -> str:
    """LD_PRELOAD for a process that loads the sanitized build: the compiler's libasan, which must come
    first, and libstdc++, without which ASan cannot intercept the C++ exceptions that libraries imported
    before the build (Triton's) throw."""
    return " ".join(subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True,
                                   check=True).stdout.strip() for name in ("libasan.so", "libstdc++.so"))


def source_dir() -> Path:
    """The csrc/ being tested: the installed package's copy (what users build), else the checkout's."""
    from rtdetrv2_kernels import _extension

    return _extension.source_dir()


def compile_flags(arch: int, sanitize: str | None) -> list[str]:
    flags = [*BASE_FLAGS, f"-DRTDETRV2_EMULATED_ARCH={arch * 10}", f"-DRTDETRV2_EMULATED_OPS={namespace(arch)}"]
    return flags + (["-O1", *SANITIZER_FLAGS] if sanitize else ["-O2"])


_loaded: dict[int, object] = {}  # arch -> op namespace
_failed: dict[int, Exception] = {}  # arch -> why its build failed


def load(arch: int):
    """Builds (once, cached by torch.utils.cpp_extension) and loads the emulated build for sm_<arch>;
    returns its op namespace. A failed build raises again on every later call, without another attempt
    (each takes a minute)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch in _failed:
        raise RuntimeError(f"the emulated sm_{arch} build failed earlier in this process: {_failed[arch]}")
    if arch not in _loaded:
        try:
            _loaded[arch] = _build(arch)
        except Exception as error:
            _failed[arch] = error
            raise
    return _loaded[arch]


def is_loaded(arch: int) -> bool:
    """Whether this process has loaded the build for sm_<arch> (load() builds it)."""
    return arch in _loaded


def _build(arch: int):
    from torch.utils import cpp_extension

    from rtdetrv2_kernels import _extension, backends
    from rtdetrv2_kernels._op_formulas import register_op_pairs

    sanitize = sanitizer()
    if sanitize and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        raise RuntimeError(f"{SANITIZE_ENV}=address needs LD_PRELOAD='{asan_preload()}' (and "
                           "ASAN_OPTIONS=detect_leaks=0) in the environment of the Python process")
    _extension._ensure_ninja_on_path()
    torch_tag = re.sub(r"\W", "_", torch.__version__)
    name = f"rtdetrv2_emulated_cuda_sm{arch}{'_asan' if sanitize else ''}_torch{torch_tag}"
    print(f"emulated_cuda: building {name} (cached after the first time)", file=sys.stderr)
    cpp_extension.load(
        name=name,
        sources=[str(HERE / source) for source in SOURCES],
        extra_cflags=compile_flags(arch, sanitize),
        extra_ldflags=SANITIZER_FLAGS if sanitize else [],
        extra_include_paths=[str(source_dir()), str(HERE)],
        is_python_module=False,
        verbose=False,
    )
    register_op_pairs(namespace(arch))
    backends.register_backend(backends.cuda_kernel_backend(backend_name(arch), namespace(arch),
                                                           explicit_device_types=("cpu",)))
    return getattr(torch.ops, namespace(arch))


def launch_counts(arch: int) -> dict[str, int]:
    """Launches so far of every kernel instantiation that csrc/cuda/ can launch (the planted test kernels
    left out), by name."""
    counts = {}
    for line in load(arch).emulated_launch_counts().splitlines():
        count, name = line.split("\t", 1)
        if "planted::" not in name:
            counts[name] = int(count)
    return counts
