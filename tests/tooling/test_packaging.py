"""The plain `pip install .` path: an isolated build ships the sources and no binary, and the kernels are
then compiled at first use against the installed torch."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import torch, rtdetrv2_kernels as rk
from rtdetrv2_kernels.backends import resolve_backend
assert rk.__file__.startswith({target!r}), rk.__file__
assert resolve_backend(None, "cpu", torch.float32, 3) == "cpu", "the C++ kernels did not load"
torch.manual_seed(0)
shapes, points = [(4, 6), (2, 3)], [2, 3]
value = torch.randn(2, 30, 2, 8, dtype=torch.float64)
locations = torch.rand(2, 4, 2, 5, 2, dtype=torch.float64)
weights = torch.rand(2, 4, 2, 5, dtype=torch.float64)
out = rk.ms_deform_attn(value, shapes, locations, weights, points)
ref = rk.ms_deform_attn_reference(value, shapes, locations, weights, points)
torch.testing.assert_close(out, ref)
print("ok")
"""


@pytest.mark.slow
def test_isolated_wheel_ships_sources_and_compiles_at_first_use(tmp_path):
    wheel_dir = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheel_dir), str(ROOT)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheel_dir.glob("rtdetrv2_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for source in ("rtdetrv2_kernels/csrc/sampling.h", "rtdetrv2_kernels/csrc/cpu/ms_deform_attn_cpu.cpp",
                   "rtdetrv2_kernels/integrations/transformers.py", "python_model/__main__.py",
                   "python_model/checkpoints.py",
                   # the kernels hub layer repository (data files, not a package)
                   *(f"rtdetrv2_kernels/integrations/kernels_hub_layer/build/torch-universal/{name}"
                     for name in ("metadata.json", "__init__.py", "layers.py"))):
        assert source in names
    assert not [n for n in names if n.endswith((".so", ".pyd"))], "an isolated build must not ship a binary"

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    env = dict(os.environ, PYTHONPATH=str(target), TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    env.pop("RTDETRV2_KERNELS_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", CHECK.format(target=str(target))], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
    assert "compiling the C++ kernels" in run.stderr  # the one-time message


def test_cuda_kernels_are_built_and_registered():
    """Where the build had nvcc and a CUDA torch (CI has both, without a GPU), the CUDA library exists,
    loads, and registers CUDA kernels for both ops."""
    import torch

    from rtdetrv2_kernels import _build_config, _extension

    reason = _build_config.cuda_unavailable_reason()
    if reason:
        pytest.skip(f"no CUDA build here: {reason}")
    if not _extension._prebuilt_path("_C_cuda"):
        pytest.skip("running from a source checkout without a prebuilt CUDA library")
    assert _extension.load("_C_cuda") is None
    for op in ("ms_deform_attn_forward", "ms_deform_attn_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rtdetrv2_kernels::{op}", "CUDA")
    # The architectures it holds are recorded, so that backend selection can check them (T4 = 7.5 included).
    assert _extension.cuda_archs() == os.environ.get("TORCH_CUDA_ARCH_LIST", _build_config.DEFAULT_CUDA_ARCHS)
    assert _build_config.runs_on(_extension.cuda_archs(), (7, 5))


def test_cuda_toolkit_detection_explains_a_misleading_cuda_home(tmp_path, monkeypatch):
    """An nvcc wrapper outside the toolkit makes torch guess a CUDA_HOME without the runtime library: the
    build must say so instead of failing at link time."""
    import torch
    import torch.utils.cpp_extension as cpp_extension

    from rtdetrv2_kernels import _build_config

    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch never builds the CUDA kernels")
    fake_toolkit(tmp_path, torch.version.cuda)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert "has no lib64/libcudart.so" in _build_config.cuda_unavailable_reason()
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libcudart.so.13").write_text("")
    assert _build_config.cuda_unavailable_reason() is None


def test_cuda_build_can_be_turned_off(tmp_path, monkeypatch):
    """RTDETRV2_BUILD_CUDA=0 (the main job sets it where no GPU could run the CUDA kernels) leaves the CUDA
    library out even where it could be built, saying why."""
    import torch.utils.cpp_extension as cpp_extension

    from rtdetrv2_kernels import _build_config

    fake_toolkit(tmp_path, "13.0")
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libcudart.so.13").write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("RTDETRV2_BUILD_CUDA", "0")
    assert "RTDETRV2_BUILD_CUDA=0 is set" in _build_config.cuda_unavailable_reason()
    monkeypatch.setenv("RTDETRV2_BUILD_CUDA", "1")
    assert "RTDETRV2_BUILD_CUDA" not in (_build_config.cuda_unavailable_reason() or "")


def fake_toolkit(root, release):
    """A toolkit root whose bin/nvcc reports CUDA `release`."""
    (root / "bin").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.0'\n")
    nvcc.chmod(0o755)


def test_cuda_toolkit_in_debian_layout_is_accepted(tmp_path, monkeypatch):
    """Debian's nvidia-cuda-toolkit: CUDA_HOME=/usr, libcudart in lib/x86_64-linux-gnu."""
    import torch
    import torch.utils.cpp_extension as cpp_extension

    from rtdetrv2_kernels import _build_config

    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch never builds the CUDA kernels")
    fake_toolkit(tmp_path, torch.version.cuda)
    (tmp_path / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "lib" / "x86_64-linux-gnu" / "libcudart.so.13").write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert _build_config.cuda_unavailable_reason() is None


def test_nvcc_of_another_cuda_major_skips_only_the_cuda_kernels(tmp_path, monkeypatch):
    """torch's BuildExtension refuses an nvcc whose major version differs from torch's CUDA, before it builds
    anything: the CUDA library is left out (saying why), so the CPU kernels still build."""
    import torch
    import torch.utils.cpp_extension as cpp_extension

    from rtdetrv2_kernels import _build_config

    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch never builds the CUDA kernels")
    other = f"{int(torch.version.cuda.split('.')[0]) - 1}.4"
    fake_toolkit(tmp_path, other)
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libcudart.so.12").write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    reason = _build_config.cuda_unavailable_reason()
    assert f"is CUDA {other} but this torch was built with CUDA {torch.version.cuda}" in reason


@pytest.mark.parametrize("archs,capability,runs", [
    ("7.5;8.0;8.6;8.9;9.0+PTX", (7, 5), True),  # T4
    ("8.0;8.6;8.9;9.0+PTX", (7, 5), False),  # the old default on a T4: "no kernel image is available"
    ("8.0", (8, 6), True),  # machine code runs on a later minor version of its major
    ("8.6", (8, 0), False),
    ("9.0+PTX", (12, 0), True),  # PTX is compiled by the driver for later GPUs
    ("9.0", (10, 0), False),
])
def test_binary_architectures_against_the_gpu(archs, capability, runs):
    from rtdetrv2_kernels import _build_config

    assert _build_config.runs_on(archs, capability) is runs


def test_backend_selection_skips_cuda_kernels_built_for_other_gpus(monkeypatch):
    import torch

    from rtdetrv2_kernels import backends

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    reason = backends._gpu_mismatch_reason("8.0;8.6;8.9;9.0+PTX")
    assert "built for compute capabilities 8.0;8.6;8.9;9.0+PTX, not this GPU's 7.5" in reason
    assert backends._gpu_mismatch_reason("7.5;8.0") is None
    assert backends._gpu_mismatch_reason(None) is None  # built at first use, for the GPUs present


@pytest.mark.slow
def test_fast_path_cuda_kernels_do_not_spill():
    from rtdetrv2_kernels import _build_config

    reason = _build_config.cuda_unavailable_reason()
    if reason:
        pytest.skip(f"no CUDA toolkit here: {reason}")
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "ptxas_report.py"), "--arch", "90", "--check"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    # the report lists the vectorized kernels of the plain op (both level tables, every point-lane count: up to
    # four in the forward, eight in the backward) and the fused op, and the deterministic backward
    for levels in ("LevelParams", "DeviceLevels"):
        for point_lanes in (1, 2, 4, 8):
            forward = f"| forward_kernel<float, 4, {point_lanes}, false, PlainPoints<float>, {levels}> | sm_90 |"
            assert (forward in run.stdout) == (point_lanes <= 4), forward
            assert (f"| backward_kernel<float, 4, {point_lanes}, false, true, PlainPoints<float>, {levels}, FixedPointSink> "
                    "| sm_90 |" in run.stdout)
    assert ("| backward_kernel<c10::BFloat16, 8, 4, false, true, FusedPoints<c10::BFloat16>, LevelParams, "
            "FloatSink<float> > | sm_90 |" in run.stdout)
