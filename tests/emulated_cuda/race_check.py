"""Builds race_check.cpp with the emulated kernels under ThreadSanitizer, linked against the installed torch."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from . import HERE, SOURCES, compile_flags, source_dir

ARCH = 90  # the float4 atomics; the arch changes no other shared-memory access


def build() -> Path:
    """The executable, rebuilt when its sources, flags or torch change; cached under the torch extensions
    directory."""
    import torch
    from torch.utils import cpp_extension

    sources = [HERE / s for s in (*SOURCES, "race_check.cpp")]
    flags = [f for f in compile_flags(ARCH, None) if f != "-O2"]
    flags += ["-O1", "-g", "-fsanitize=thread", "-D_GLIBCXX_USE_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI))]
    includes = [source_dir(), HERE, *map(Path, cpp_extension.include_paths())]
    libraries = Path(torch.__file__).parent / "lib"
    command = ["g++", *flags, *(f"-I{p}" for p in includes), *map(str, sources), f"-L{libraries}",
               f"-Wl,-rpath,{libraries}", "-lc10", "-ltorch_cpu", "-ltorch", "-o"]
    digest = hashlib.sha256(" ".join(command).encode())
    for header in sorted([*HERE.glob("*.h"), *source_dir().rglob("*.h"), *source_dir().rglob("*.cu"), *sources]):
        digest.update(header.read_bytes())
    target = Path(cpp_extension._get_build_directory("rtdetrv2_race_check", verbose=False)) / f"race_check_{digest.hexdigest()[:16]}"
    if not target.exists():
        print(f"emulated_cuda: building {target.name} under ThreadSanitizer", file=sys.stderr)
        result = subprocess.run([*command, str(target)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the ThreadSanitizer check failed:\n{result.stderr[-4000:]}")
    return target
