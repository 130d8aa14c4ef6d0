"""Compiles every Triton kernel variant to cubin for sm_75, sm_80 and sm_90 without a GPU, with the Triton
of the Python running it, and prints one line per variant with its compile time. Run by
tests/op/test_triton_compile.py (in a subprocess, without TRITON_INTERPRET) for each supported Triton.

    python tests/op/triton_compile_check.py [--shape small|rtdetrv2] [--archs 75 80 90]

The signature is the one the launchers produce on a GPU: Python ints become i32 (when they fit), Python
floats fp32, pointers carry the tensors' dtypes. Exits non-zero if any variant fails to compile.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rtdetrv2_kernels import triton_ms_deform_attn as kernels

# The compile-time constants of a model (level shapes are run-time values, in the level table).
SHAPES = {
    # Two levels: every code path, compiled quickly.
    "small": dict(H=2, C=8, P=3, POINTS=(1, 2), FIRST_POINT=(0, 1, 3), NUM_LEVELS=2),
    # RT-DETRv2 (its decoder's cross-attention): what a user's first call compiles.
    "rtdetrv2": dict(H=8, C=32, P=12, POINTS=(4, 4, 4), FIRST_POINT=(0, 4, 8, 12), NUM_LEVELS=3),
}
DTYPES = {"fp32": tl.float32, "fp16": tl.float32, "bf16": tl.float32, "fp64": tl.float64}  # -> ACC
SCALARS = dict(levels_ptr="*i32", Q="i32", stride_vb="i32", stride_vs="i32", stride_vh="i32", scale_hi="fp32", scale_mid="fp32",
               scale_lo="fp32")
# The plain op, or the fused op with reference boxes (one row) or reference points (one row per level).
OPS = {"plain": None, "fused-boxes": "boxes", "fused-points": "points"}


def compile_kernel(fn, pointer_types, constants, arch):
    signature = {name: pointer_types.get(name) or SCALARS.get(name) or "constexpr" for name in fn.arg_names}
    constexprs = {(fn.arg_names.index(name),): value for name, value in constants.items()}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32))


def compile_variant(arch, dtype, discrete, op, levels):
    rows, size = {None: (1, 2), "boxes": (1, 4), "points": (levels["NUM_LEVELS"], 2)}[OPS[op]]
    acc = DTYPES[dtype]
    accumulate = "fp64" if dtype == "fp64" else "fp32"
    constants = dict(levels, DISCRETE=discrete, ACC=acc, FUSED=OPS[op] is not None, R=rows, K=size, BLOCK_Q=32,
                     BLOCK_C=triton.next_power_of_2(levels["C"]))
    seconds = []
    start = time.perf_counter()
    forward = compile_kernel(kernels._forward_kernel,
                             {n: "*" + dtype for n in ("value_ptr", "loc_ptr", "weight_ptr", "out_ptr", "ref_ptr")},
                             constants, arch)
    seconds.append(time.perf_counter() - start)
    pointers = {n: "*" + dtype for n in ("grad_out_ptr", "value_ptr", "loc_ptr", "weight_ptr", "ref_ptr")}
    # grad_value and the reference gradient accumulate in ACC; so does the fused op's logits gradient.
    pointers.update(grad_value_ptr="*" + accumulate, grad_loc_ptr="*" + dtype, grad_ref_ptr="*" + accumulate,
                    grad_weight_ptr="*" + (accumulate if OPS[op] else dtype))
    start = time.perf_counter()
    backward = compile_kernel(kernels._backward_kernel, pointers, constants, arch)
    seconds.append(time.perf_counter() - start)
    assert forward.asm["cubin"] and backward.asm["cubin"]
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--archs", type=int, nargs="+", default=[75, 80, 90])
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, shape {args.shape}", flush=True)
    failed = 0
    for arch, dtype, discrete, op in itertools.product(args.archs, args.dtypes, (False, True), args.ops):
        name = f"sm_{arch} {dtype} {'discrete' if discrete else 'bilinear'} {op}"
        try:
            forward, backward = compile_variant(arch, dtype, discrete, op, SHAPES[args.shape])
        except Exception as error:  # report every variant, then fail
            failed += 1
            print(f"{name}: FAILED {type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}", flush=True)
        else:
            print(f"{name}: ok (forward {forward:.1f} s, backward {backward:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
