"""The Triton kernels compile for the GPUs we target (sm_80, sm_90) down to cubin, without a GPU: this
catches what the interpreter cannot (typing, lowering, register allocation failures)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from rtdetrv2_kernels import triton_ms_deform_attn as kernels

    def compile_kernel(fn, pointer_types, constants, arch):
        scalars = dict(Q="i32", stride_vb="i32", stride_vs="i32", stride_vh="i32", offset_scale="fp32")
        signature = {name: pointer_types.get(name) or scalars.get(name) or "constexpr" for name in fn.arg_names}
        constexprs = {(fn.arg_names.index(name),): value for name, value in constants.items()}
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))

    levels = dict(H=8, C=32, P=12, SHAPES=(80, 80, 40, 40, 20, 20), STARTS=(0, 6400, 8000, 8400),
                  POINTS=(3, 6, 3), FIRST_POINT=(0, 3, 9, 12), NUM_LEVELS=3, BLOCK_Q=32, BLOCK_C=32)
    # (arch, dtype, discrete, fused as (reference rows R, reference size K) or None for the plain op)
    variants = ((90, "bf16", False, None), (90, "bf16", True, None), (80, "fp32", False, None),
                (80, "fp16", True, None), (90, "bf16", False, (1, 4)), (80, "fp32", True, (3, 2)))
    for arch, dtype, discrete, fused in variants:
        rows, size = fused or (1, 2)
        constants = dict(levels, DISCRETE=discrete, ACC=tl.float32, FUSED=fused is not None, R=rows, K=size)
        forward = compile_kernel(kernels._forward_kernel,
                                 {n: "*" + dtype for n in ("value_ptr", "loc_ptr", "weight_ptr", "out_ptr", "ref_ptr")},
                                 constants, arch)
        pointers = {n: "*" + dtype for n in ("grad_out_ptr", "value_ptr", "loc_ptr", "weight_ptr", "ref_ptr")}
        # the fused backward keeps the logits' gradient in the accumulation dtype
        pointers.update(grad_value_ptr="*fp32", grad_loc_ptr="*" + dtype, grad_ref_ptr="*fp32",
                        grad_weight_ptr="*fp32" if fused else "*" + dtype)
        backward = compile_kernel(kernels._backward_kernel, pointers, constants, arch)
        assert forward.asm["cubin"] and backward.asm["cubin"]
        print(f"sm_{arch} {dtype} discrete={discrete} fused={fused}: ok")
    """
)


@pytest.mark.slow
def test_triton_kernels_compile_for_sm80_and_sm90():  # plain and fused, both methods
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(": ok") == 6
