"""What the Triton kernels look like to a GPU, checked without one: every variant compiles to cubin (sm_75,
sm_80, sm_90) with the newest Triton and with the Triton of the oldest torch we support, fp64 runs compute
in fp64, and the launch grid and arguments stay within what CUDA accepts. The interpreter, which the other
tests run the kernels in, is more lenient on each of these."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from rtdetrv2_kernels import triton_ms_deform_attn as kernels  # noqa: E402

CHECK = Path(__file__).resolve().parent / "triton_compile_check.py"
# scripts/test.sh points this at a virtualenv with the oldest torch of pyproject.toml (and its Triton).
OLDEST_ENV = "RTDETRV2_OLDEST_TORCH_PYTHON"
PYTHONS = [
    pytest.param(sys.executable, id="this-triton"),
    pytest.param(os.environ.get(OLDEST_ENV, ""), id="oldest-torch-triton",
                 marks=pytest.mark.skipif(not os.environ.get(OLDEST_ENV), reason=f"{OLDEST_ENV} is not set")),
]


def compiler_environment():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter
    package_root = Path(kernels.__file__).resolve().parents[1]  # the package under test, for either Python
    env["PYTHONPATH"] = os.pathsep.join([str(package_root), str(CHECK.parent)])
    return env


def compile_and_print(script: str, python: str = sys.executable) -> str:
    """The output of `script`, run by `python` with Triton compiling for real."""
    run = subprocess.run([python, "-c", script], env=compiler_environment(), capture_output=True,
                         text=True, timeout=900, cwd="/")
    assert run.returncode == 0, run.stderr[-4000:]
    print(run.stdout)
    return run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("python", PYTHONS)
def test_every_variant_compiles_for_sm75_sm80_and_sm90(python):
    run = subprocess.run([python, str(CHECK)], env=compiler_environment(), capture_output=True, text=True,
                         timeout=1800, cwd="/")
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    # 3 architectures x 4 dtypes x 2 methods x (plain, fused boxes, fused points)
    assert run.stdout.count(": ok") == 72, run.stdout


FP64_SCRIPT = """
import re, triton.language as tl, triton_compile_check as check
for op, (rows, size) in (("boxes", (1, 4)), ("points", (2, 2))):
    constants = dict(check.SHAPES["small"], DISCRETE=False, ACC=tl.float64, FUSED=True, R=rows, K=size,
                     BLOCK_Q=32, BLOCK_C=8)
    pointers = {n: "*fp64" for n in ("value_ptr", "loc_ptr", "weight_ptr", "out_ptr", "ref_ptr", "grad_out_ptr",
                                     "grad_value_ptr", "grad_loc_ptr", "grad_weight_ptr", "grad_ref_ptr")}
    for kernel in (check.kernels._forward_kernel, check.kernels._backward_kernel):
        ttir = check.compile_kernel(kernel, pointers, constants, 90).asm["ttir"]
        fp32_math = [line.strip() for line in ttir.splitlines()
                     if re.search(r"arith\\.(add|sub|mul|div)f .*: (tensor<[0-9x]+)?f32\\b", line)]
        print(op, kernel.__name__, "fp32 arithmetic:", fp32_math[:3] or "none")
"""


@pytest.mark.slow
def test_fp64_fused_kernels_do_no_fp32_arithmetic():
    # On a GPU a Python float argument is fp32 and a float literal an fp32 constant: offset_scale and the
    # per-level factors must reach fp64 runs as fp64 (docs/semantics.md promises 1e-10 relative in fp64).
    assert compile_and_print(FP64_SCRIPT).count("fp32 arithmetic: none") == 4


@pytest.mark.parametrize("value", [0.5, 0.1, 1 / 3, 2.0**-60, 123456.789, 0.0])
def test_offset_scale_reaches_the_kernel_as_exact_fp32_parts(value):
    parts = kernels._offset_scale_parts(value)
    for part in parts:  # what the compiled signature receives: fp32 values
        assert struct.unpack("f", struct.pack("f", part))[0] == part
    assert sum(parts) == value  # summed in fp64 (exactly: each part is far below the previous one)


def test_grid_puts_batch_and_heads_on_the_axis_without_the_65535_limit():
    grid = kernels._grid(queries=300, batch_heads=16 * 8192, block_q=16)  # B * H = 131072 > 65535
    assert len(grid) == 1 and grid[0] == 131072 * 19 <= 2**31 - 1
    with pytest.raises(ValueError, match="grid limit"):
        kernels._grid(queries=2**20, batch_heads=2**20, block_q=16)


def test_launches_go_to_the_tensors_device():
    # Triton launches on the current device; the ops make the tensors' device current. (Only a machine with
    # two GPUs could run them on cuda:1; this checks the guard that is taken.)
    guard = kernels._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(kernels._device_guard(torch.device("cpu")), torch.cuda.device)


INT64_SCRIPT = """
import re, triton.language as tl, triton_compile_check as check
constants = dict(check.SHAPES["small"], DISCRETE=False, ACC=tl.float32, FUSED=False, R=1, K=2, BLOCK_Q=32,
                 BLOCK_C=8)
pointers = {n: "*fp32" for n in ("value_ptr", "loc_ptr", "weight_ptr", "out_ptr", "ref_ptr", "grad_out_ptr",
                                 "grad_value_ptr", "grad_loc_ptr", "grad_weight_ptr", "grad_ref_ptr")}
for kernel in (check.kernels._forward_kernel, check.kernels._backward_kernel):
    ttir = check.compile_kernel(kernel, pointers, constants, 90).asm["ttir"]
    widened = sorted(set(re.findall(r"arith\\.extsi %(stride_v[bsh])\\w* : i32 to i64", ttir)))
    print(kernel.__name__, "widened:", " ".join(widened))
"""


@pytest.mark.slow
def test_value_offsets_are_int64_when_strides_arrive_as_i32():
    # A batch element of value with 2^31 elements or more (a permuted view, say) must not wrap: each i32
    # stride is widened before it multiplies a batch, head, level start or row.
    assert compile_and_print(INT64_SCRIPT).count("widened: stride_vb stride_vh stride_vs") == 2


SPECIALIZATION_SCRIPT = """
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from rtdetrv2_kernels import triton_ms_deform_attn as kernels

# What each op would launch, with the arguments it passes (CPU tensors: only their dtype and alignment count).
launches = []
kernels._launch = lambda tuned, plain, arguments: launches.append((plain, arguments))
points, heads, channels = [4, 4, 4], 8, 32
for height, width in [(size, size) for size in range(480, 801, 32)] + [(480, 640), (736, 1088)]:
    shapes = [s for stride in (8, 16, 32) for s in (-(-height // stride), -(-width // stride))]
    rows = sum(h * w for h, w in zip(shapes[0::2], shapes[1::2]))
    value = torch.randn(1, rows, heads, channels)
    for queries in (300, rows):  # a decoder's queries, and an encoder's (one per value row)
        locations = torch.rand(1, queries, heads, 12, 2)
        weights = torch.rand(1, queries, heads, 12)
        grad = torch.randn(1, queries, heads * channels)
        kernels.triton_ms_deform_attn_forward(value, shapes, locations, weights, points, "default")
        kernels.triton_ms_deform_attn_backward(grad, value, shapes, locations, weights, points, "default")
    reference = torch.rand(1, 300, 1, 4)
    kernels.triton_ms_deform_attn_fused_forward(value, shapes, reference, locations[:, :300], weights[:, :300],
                                                points, 0.5, "default")
backend = make_backend(GPUTarget("cuda", 90, 32))
keys = {}
for kernel, arguments in launches:
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    _, specialization, _ = binder(**arguments, BLOCK_Q=16, num_warps=2)
    keys.setdefault(kernel.__name__, set()).add(repr(specialization))
print("launches:", len(launches))
for name, distinct in sorted(keys.items()):
    print(name, "compiles:", len(distinct))
"""


@pytest.mark.parametrize("python", PYTHONS)
def test_a_new_image_size_compiles_no_new_kernel(python):
    # Multi-scale training (RT-DETR's sizes, every 32 from 480 to 800, and two non-square ones) and encoder
    # calls with one query per value row: what Triton keys its compiled kernels on must not change with them.
    counts = dict(re.findall(r"^(\w+)(?: compiles)?: (\d+)$", compile_and_print(SPECIALIZATION_SCRIPT, python), re.M))
    # forward: the plain op and the fused op (their constants differ); backward: the plain op.
    assert counts == {"launches": "65", "_forward_kernel": "2", "_backward_kernel": "1"}


def test_every_launch_passes_exactly_the_kernels_parameters_by_name(monkeypatch):
    # The ops pass every argument by name: a parameter added, removed or renamed in a kernel's signature fails
    # here (a moved one changes nothing), where positional arguments would shift silently. Nothing runs.
    launches = []
    monkeypatch.setattr(kernels, "_launch", lambda tuned, plain, arguments: launches.append((tuned, plain, arguments)))
    ops = torch.ops.rtdetrv2_kernels
    shapes, points = [4, 8, 3, 5], [2, 3]
    value, grad = torch.randn(2, 47, 3, 4), torch.randn(2, 5, 12)
    locations, weights = torch.rand(2, 5, 3, 5, 2), torch.rand(2, 5, 3, 5)
    ops.triton_ms_deform_attn_forward(value, shapes, locations, weights, points, "default")
    ops.triton_ms_deform_attn_backward(grad, value, shapes, locations, weights, points, "default")
    for reference in (torch.rand(2, 5, 1, 4), torch.rand(2, 5, 2, 2)):  # boxes; points, one per level
        ops.triton_ms_deform_attn_fused_forward(value, shapes, reference, locations, weights, points, 0.5, "default")
        ops.triton_ms_deform_attn_fused_backward(grad, value, shapes, reference, locations, weights, points, 0.5,
                                                 "default")
    assert [(plain, arguments["FUSED"]) for _, plain, arguments in launches] == [
        (kernels._forward_kernel, False), (kernels._backward_kernel, False),
        *[(kernels._forward_kernel, True), (kernels._backward_kernel, True)] * 2]
    tuned_by_config = {name for config in kernels._TUNING for name in config.kwargs}
    assert tuned_by_config == {"BLOCK_Q"}  # what _launch adds (or the autotuner does)
    for tuned, plain, arguments in launches:
        assert tuned.fn is plain
        assert sorted(arguments) == sorted(set(plain.arg_names) - tuned_by_config), plain.__name__


def test_level_table_holds_each_levels_shape_and_first_row_then_the_row_count():
    table = kernels._level_table([4, 8, 3, 5, 1, 1], torch.device("cpu"))
    assert table.dtype == torch.int32 and table.tolist() == [4, 8, 0, 3, 5, 32, 1, 1, 47, 48]
    assert kernels._level_table((4, 8, 3, 5, 1, 1), torch.device("cpu")) is table  # made once per shapes
    with pytest.raises(ValueError, match="2\\^31 - 1"):
        kernels._level_table([65536, 32768], torch.device("cpu"))
