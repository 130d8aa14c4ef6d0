"""Triton kernels for ms_deform_attn (the "triton" backend): forward and backward, bilinear and discrete
sampling, per-level point counts. The contract is docs/semantics.md; the sampling math mirrors
csrc/sampling.h line for line.

One program covers BLOCK_Q queries of one (batch, head) with the channels as the vector dimension. Point
counts are compile-time constants (a model has one list of them) and the level loop unrolls; the level
shapes are read from a small device table (_level_table), so a new image size compiles nothing. Each
point's location and weight are loaded once per program and its corners are gathered as [BLOCK_Q, BLOCK_C]
tiles. The backward reduces the location and weight gradients over channels inside the program and scatters
grad_value with atomic adds into an fp32 (fp64 for fp64) buffer, cast at the end.

The ops are opaque torch.library custom ops with fake kernels, so torch.compile traces them without graph
breaks, also when Triton runs in interpreter mode (TRITON_INTERPRET=1) on CPU tensors, as the tests do.
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings

import torch
import triton
import triton.language as tl

from ._op_formulas import fused_reference, plain_reference, register_autograd, register_fakes
from ._validation import METHODS, check_dtypes_and_devices


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _bilinear_corner(x0, y0, fx, fy, near, height, width, DX: tl.constexpr, DY: tl.constexpr):
    """Row offset in the level, inside mask, weight and weight derivatives of corner (x0+DX, y0+DY)."""
    cx = x0 + DX
    cy = y0 + DY
    inside = near & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    wx = fx if DX == 1 else 1.0 - fx
    wy = fy if DY == 1 else 1.0 - fy
    weight = tl.where(inside, wx * wy, 0.0)
    dweight_dx = tl.where(inside, wy if DX == 1 else -wy, 0.0)
    dweight_dy = tl.where(inside, wx if DY == 1 else -wx, 0.0)
    offset = tl.where(inside, cy * width + cx, 0)
    return offset, inside, weight, dweight_dx, dweight_dy


@triton.jit
def _pixel_coordinates(loc_x, loc_y, height, width):
    """Bilinear: floor of the pixel coordinates, fractions, and whether any corner can be inside."""
    x = loc_x * width - 0.5
    y = loc_y * height - 0.5
    # Written so NaN fails it; outside it the coordinates are replaced before the int conversion.
    near = (x >= -1.0) & (x < width) & (y >= -1.0) & (y < height)
    x_floor = tl.floor(tl.where(near, x, -2.0))
    y_floor = tl.floor(tl.where(near, y, -2.0))
    return x_floor.to(tl.int32), y_floor.to(tl.int32), x - x_floor, y - y_floor, near


@triton.jit
def _nearest_index(loc, size):
    """Discrete: floor(loc * size + 0.5) clamped into [0, size - 1], and False for NaN."""
    t = loc * size + 0.5
    valid = t == t
    t = tl.minimum(tl.maximum(tl.where(valid, t, 0.0), 0.0), size - 1.0)
    return tl.floor(t).to(tl.int32), valid


@triton.jit
def _discrete_offset(loc_x, loc_y, height, width):
    """Discrete: the row (y * width + x) within the level, and whether the sample reads it."""
    x, valid_x = _nearest_index(loc_x, width)
    y, valid_y = _nearest_index(loc_y, height)
    return y * width + x, valid_x & valid_y


@triton.jit
def _level(levels_ptr, level: tl.constexpr):
    """Height, width and first row (int64) of a level, from the (NUM_LEVELS * 3 + 1) int32 table of
    _level_table: read at run time, so a new image size is no new kernel."""
    row = levels_ptr + 3 * level
    return tl.load(row), tl.load(row + 1), tl.load(row + 2).to(tl.int64)


@triton.jit
def _program_tile(Q, H: tl.constexpr, C: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's batch and head (int64, as every offset computed from them), its queries'
    (b * Q + q) * H + h indices, and the tile masks. Programs are numbered (b * H + h) * blocks + block on
    grid axis 0, the one without CUDA's 65535 limit (_grid)."""
    blocks = tl.cdiv(Q, BLOCK_Q)
    program = tl.program_id(0).to(tl.int64)
    bh = program // blocks
    b = bh // H
    h = bh % H
    q = (program % blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < Q
    c = tl.arange(0, BLOCK_C)
    tile_mask = q_mask[:, None] & (c < C)[None, :]
    return b, h, (b * Q + q) * H + h, q_mask, c, tile_mask


@triton.jit
def _load_point(loc_ptr, weight_ptr, point, q_mask, ACC: tl.constexpr):
    """Attention weight and (x, y) location of one point for every query of the tile."""
    w = tl.load(weight_ptr + point, mask=q_mask, other=0.0).to(ACC)
    loc_x = tl.load(loc_ptr + 2 * point, mask=q_mask, other=0.0).to(ACC)
    loc_y = tl.load(loc_ptr + 2 * point + 1, mask=q_mask, other=0.0).to(ACC)
    return w, loc_x, loc_y


@triton.jit
def _softmax_stats(logit_ptr, bqh, q_mask, P: tl.constexpr, ACC: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Fused op: the largest of each query's P logits and the sum of exp(logit - largest)."""
    largest = tl.full([BLOCK_Q], float("-inf"), ACC)
    for p in tl.range(0, P):
        largest = tl.maximum(largest, tl.load(logit_ptr + bqh * P + p, mask=q_mask, other=0.0).to(ACC))
    total = tl.zeros([BLOCK_Q], ACC)
    for p in tl.range(0, P):
        total += tl.exp(tl.load(logit_ptr + bqh * P + p, mask=q_mask, other=0.0).to(ACC) - largest)
    return largest, total


@triton.jit
def _offset_factors(offset_scale, count, height, width, K: tl.constexpr, ACC: tl.constexpr):
    """Fused op: d loc / d offset per axis on a level, less the box size for boxes (docs/semantics.md), in
    ACC (a float literal would be an fp32 constant on the GPU)."""
    if K == 4:
        return offset_scale / count, offset_scale / count
    one = tl.full([], 1.0, ACC)
    return one / width, one / height


@triton.jit
def _fused_point(ref_row, offset_ptr, logit_ptr, point, q_mask, largest, total, factor_x, factor_y,
                 K: tl.constexpr, ACC: tl.constexpr):
    """Fused op: weight (softmax) and (x, y) location of one point for every query of the tile, and the
    reference box size (ones for points) that scales its offsets."""
    w = tl.exp(tl.load(logit_ptr + point, mask=q_mask, other=0.0).to(ACC) - largest) / total
    offset_x = tl.load(offset_ptr + 2 * point, mask=q_mask, other=0.0).to(ACC)
    offset_y = tl.load(offset_ptr + 2 * point + 1, mask=q_mask, other=0.0).to(ACC)
    ref_x = tl.load(ref_row, mask=q_mask, other=0.0).to(ACC)
    ref_y = tl.load(ref_row + 1, mask=q_mask, other=0.0).to(ACC)
    if K == 4:
        size_x = tl.load(ref_row + 2, mask=q_mask, other=0.0).to(ACC)
        size_y = tl.load(ref_row + 3, mask=q_mask, other=0.0).to(ACC)
    else:
        size_x = tl.full(w.shape, 1.0, ACC)
        size_y = tl.full(w.shape, 1.0, ACC)
    loc_x = ref_x + offset_x * factor_x * size_x
    loc_y = ref_y + offset_y * factor_y * size_y
    return w, loc_x, loc_y, offset_x, offset_y, size_x, size_y


@triton.jit
def _gather(rows_ptr, offset, inside, c, tile_mask, stride, ACC: tl.constexpr):
    """[BLOCK_Q, BLOCK_C] tile of the rows at `offset` (zeros where not `inside`)."""
    row = offset.to(tl.int64)[:, None]
    return tl.load(rows_ptr + row * stride + c[None, :], mask=tile_mask & inside[:, None], other=0.0).to(ACC)


# Q is not specialized (Triton would compile again whenever Q % 16 changed); the strides are, as their
# divisibility lets loads vectorize, and only change with the image size when H * C is not a multiple of 16.
@triton.jit(do_not_specialize=["Q"])
def _forward_kernel(
    value_ptr, loc_ptr, weight_ptr, out_ptr,
    levels_ptr, Q, stride_vb, stride_vs, stride_vh,
    ref_ptr, scale_hi, scale_mid, scale_lo,
    H: tl.constexpr, C: tl.constexpr, P: tl.constexpr, POINTS: tl.constexpr, FIRST_POINT: tl.constexpr,
    NUM_LEVELS: tl.constexpr, DISCRETE: tl.constexpr, ACC: tl.constexpr,
    FUSED: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Plain op: loc_ptr and weight_ptr are the locations and weights. FUSED: they are the raw offsets and
    logits, ref_ptr the (B, Q, R, K) reference points and scale_* offset_scale (_offset_scale_parts); all
    unused otherwise."""
    b, h, bqh, q_mask, c, tile_mask = _program_tile(Q, H, C, BLOCK_Q, BLOCK_C)
    # Strides arrive as i32 when they fit; their products with starts and rows may not.
    stride_vs = tl.cast(stride_vs, tl.int64)
    value_bh = value_ptr + b * stride_vb + h * stride_vh
    if FUSED:
        offset_scale = tl.cast(scale_hi, ACC) + tl.cast(scale_mid, ACC) + tl.cast(scale_lo, ACC)
        largest, total = _softmax_stats(weight_ptr, bqh, q_mask, P, ACC, BLOCK_Q)
    acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=ACC)
    for level in tl.static_range(NUM_LEVELS):
        height, width, start = _level(levels_ptr, level)
        rows = value_bh + start * stride_vs
        if FUSED:
            factor_x, factor_y = _offset_factors(offset_scale, POINTS[level], height, width, K, ACC)
            ref_row = ref_ptr + ((bqh // H) * R + (level if R > 1 else 0)) * K
        # A loop, not unrolled: unrolling each point made the kernels compile 5 to 10 times slower.
        for i in tl.range(0, POINTS[level]):
            point = bqh * P + FIRST_POINT[level] + i
            if FUSED:
                w, loc_x, loc_y, _, _, _, _ = _fused_point(ref_row, loc_ptr, weight_ptr, point, q_mask, largest,
                                                           total, factor_x, factor_y, K, ACC)
            else:
                w, loc_x, loc_y = _load_point(loc_ptr, weight_ptr, point, q_mask, ACC)
            if DISCRETE:
                offset, valid = _discrete_offset(loc_x, loc_y, height, width)
                acc += w[:, None] * _gather(rows, offset, valid, c, tile_mask, stride_vs, ACC)
            else:
                x0, y0, fx, fy, near = _pixel_coordinates(loc_x, loc_y, height, width)
                o00, m00, w00, _, _ = _bilinear_corner(x0, y0, fx, fy, near, height, width, 0, 0)
                o01, m01, w01, _, _ = _bilinear_corner(x0, y0, fx, fy, near, height, width, 1, 0)
                o10, m10, w10, _, _ = _bilinear_corner(x0, y0, fx, fy, near, height, width, 0, 1)
                o11, m11, w11, _, _ = _bilinear_corner(x0, y0, fx, fy, near, height, width, 1, 1)
                # All four gathers are issued before any of them is used.
                v00 = _gather(rows, o00, m00, c, tile_mask, stride_vs, ACC)
                v01 = _gather(rows, o01, m01, c, tile_mask, stride_vs, ACC)
                v10 = _gather(rows, o10, m10, c, tile_mask, stride_vs, ACC)
                v11 = _gather(rows, o11, m11, c, tile_mask, stride_vs, ACC)
                sample = w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11
                acc += w[:, None] * sample
    tl.store(out_ptr + bqh[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _scatter_corner(grad_out, value_rows, grad_rows, offset, inside, scale, c, tile_mask, stride_vs, stride_gs,
                    ACC: tl.constexpr):
    """grad_value[corner] += scale * grad_out; returns grad_out . value[corner] per query."""
    v = _gather(value_rows, offset, inside, c, tile_mask, stride_vs, ACC)
    row = offset.to(tl.int64)[:, None]
    tl.atomic_add(grad_rows + row * stride_gs + c[None, :], scale[:, None] * grad_out,
                  mask=tile_mask & inside[:, None], sem="relaxed")
    return tl.sum(grad_out * v, axis=1)


@triton.jit
def _store_reference_grads(grad_ref_ptr, bqh, r, q_mask, g_x, g_y, g_w, g_h, R: tl.constexpr, K: tl.constexpr):
    """Fused op: one head's gradient of reference row r, into the (B, Q, H, R, K) buffer."""
    row = grad_ref_ptr + (bqh * R + r) * K
    tl.store(row, g_x, mask=q_mask)
    tl.store(row + 1, g_y, mask=q_mask)
    if K == 4:
        tl.store(row + 2, g_w, mask=q_mask)
        tl.store(row + 3, g_h, mask=q_mask)


@triton.jit(do_not_specialize=["Q"])  # as _forward_kernel
def _backward_kernel(
    grad_out_ptr, value_ptr, loc_ptr, weight_ptr, grad_value_ptr, grad_loc_ptr, grad_weight_ptr,
    levels_ptr, Q, stride_vb, stride_vs, stride_vh,
    ref_ptr, scale_hi, scale_mid, scale_lo, grad_ref_ptr,
    H: tl.constexpr, C: tl.constexpr, P: tl.constexpr, POINTS: tl.constexpr, FIRST_POINT: tl.constexpr,
    NUM_LEVELS: tl.constexpr, DISCRETE: tl.constexpr, ACC: tl.constexpr,
    FUSED: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """As _forward_kernel for the arguments. FUSED: grad_loc_ptr and grad_weight_ptr receive the gradients
    of the offsets and (an ACC buffer) of the logits, grad_ref_ptr each head's reference gradient."""
    b, h, bqh, q_mask, c, tile_mask = _program_tile(Q, H, C, BLOCK_Q, BLOCK_C)
    grad_out = tl.load(grad_out_ptr + bqh[:, None] * C + c[None, :], mask=tile_mask, other=0.0).to(ACC)
    stride_vs = tl.cast(stride_vs, tl.int64)  # as in _forward_kernel
    value_bh = value_ptr + b * stride_vb + h * stride_vh
    # grad_value is a contiguous (B, S, H, C) buffer; the level table ends with S.
    stride_gs = H * C
    grad_bh = grad_value_ptr + (b * tl.load(levels_ptr + 3 * NUM_LEVELS) * H + h) * C
    out_ty = grad_loc_ptr.dtype.element_ty
    if FUSED:
        offset_scale = tl.cast(scale_hi, ACC) + tl.cast(scale_mid, ACC) + tl.cast(scale_lo, ACC)
        largest, total = _softmax_stats(weight_ptr, bqh, q_mask, P, ACC, BLOCK_Q)
        expected = tl.zeros([BLOCK_Q], ACC)  # sum over points of weight * grad_weight, for the softmax
        g_ref_x = tl.zeros([BLOCK_Q], ACC)
        g_ref_y = tl.zeros([BLOCK_Q], ACC)
        g_ref_w = tl.zeros([BLOCK_Q], ACC)
        g_ref_h = tl.zeros([BLOCK_Q], ACC)
    for level in tl.static_range(NUM_LEVELS):
        height, width, start = _level(levels_ptr, level)
        value_rows = value_bh + start * stride_vs
        grad_rows = grad_bh + start * stride_gs
        if FUSED:
            factor_x, factor_y = _offset_factors(offset_scale, POINTS[level], height, width, K, ACC)
            ref_row = ref_ptr + ((bqh // H) * R + (level if R > 1 else 0)) * K
        for i in tl.range(0, POINTS[level]):  # as in _forward_kernel
            point = bqh * P + FIRST_POINT[level] + i
            if FUSED:
                w, loc_x, loc_y, offset_x, offset_y, size_x, size_y = _fused_point(
                    ref_row, loc_ptr, weight_ptr, point, q_mask, largest, total, factor_x, factor_y, K, ACC)
            else:
                w, loc_x, loc_y = _load_point(loc_ptr, weight_ptr, point, q_mask, ACC)
            if DISCRETE:
                offset, valid = _discrete_offset(loc_x, loc_y, height, width)
                grad_w = _scatter_corner(grad_out, value_rows, grad_rows, offset, valid, w, c, tile_mask,
                                         stride_vs, stride_gs, ACC)
                grad_x = tl.zeros_like(grad_w)
                grad_y = tl.zeros_like(grad_w)
            else:
                x0, y0, fx, fy, near = _pixel_coordinates(loc_x, loc_y, height, width)
                o00, m00, w00, dx00, dy00 = _bilinear_corner(x0, y0, fx, fy, near, height, width, 0, 0)
                o01, m01, w01, dx01, dy01 = _bilinear_corner(x0, y0, fx, fy, near, height, width, 1, 0)
                o10, m10, w10, dx10, dy10 = _bilinear_corner(x0, y0, fx, fy, near, height, width, 0, 1)
                o11, m11, w11, dx11, dy11 = _bilinear_corner(x0, y0, fx, fy, near, height, width, 1, 1)
                d00 = _scatter_corner(grad_out, value_rows, grad_rows, o00, m00, w * w00, c, tile_mask,
                                      stride_vs, stride_gs, ACC)
                d01 = _scatter_corner(grad_out, value_rows, grad_rows, o01, m01, w * w01, c, tile_mask,
                                      stride_vs, stride_gs, ACC)
                d10 = _scatter_corner(grad_out, value_rows, grad_rows, o10, m10, w * w10, c, tile_mask,
                                      stride_vs, stride_gs, ACC)
                d11 = _scatter_corner(grad_out, value_rows, grad_rows, o11, m11, w * w11, c, tile_mask,
                                      stride_vs, stride_gs, ACC)
                grad_w = w00 * d00 + w01 * d01 + w10 * d10 + w11 * d11
                # Chain rule through x = loc_x * W - 0.5 and y = loc_y * H - 0.5.
                grad_x = w * (dx00 * d00 + dx01 * d01 + dx10 * d10 + dx11 * d11) * width
                grad_y = w * (dy00 * d00 + dy01 * d01 + dy10 * d10 + dy11 * d11) * height
            if FUSED:
                # The raw weight gradient waits in the (ACC) logits buffer for the softmax pass below.
                tl.store(grad_weight_ptr + point, grad_w, mask=q_mask)
                expected += w * grad_w
                # Discrete locations pass no gradient: the offsets and references keep their zeros, also
                # where the chain rule would multiply zero by an infinite or NaN offset or box size.
                if not DISCRETE:
                    tl.store(grad_loc_ptr + 2 * point, (grad_x * factor_x * size_x).to(out_ty), mask=q_mask)
                    tl.store(grad_loc_ptr + 2 * point + 1, (grad_y * factor_y * size_y).to(out_ty), mask=q_mask)
                    g_ref_x += grad_x
                    g_ref_y += grad_y
                    if K == 4:
                        g_ref_w += grad_x * factor_x * offset_x
                        g_ref_h += grad_y * factor_y * offset_y
            else:
                tl.store(grad_weight_ptr + point, grad_w.to(out_ty), mask=q_mask)
                tl.store(grad_loc_ptr + 2 * point, grad_x.to(out_ty), mask=q_mask)
                tl.store(grad_loc_ptr + 2 * point + 1, grad_y.to(out_ty), mask=q_mask)
        if FUSED and R > 1:  # one reference row per level: this level's is complete
            _store_reference_grads(grad_ref_ptr, bqh, level, q_mask, g_ref_x, g_ref_y, g_ref_w, g_ref_h, R, K)
            g_ref_x = tl.zeros([BLOCK_Q], ACC)
            g_ref_y = tl.zeros([BLOCK_Q], ACC)
            g_ref_w = tl.zeros([BLOCK_Q], ACC)
            g_ref_h = tl.zeros([BLOCK_Q], ACC)
    if FUSED:
        if R == 1:
            _store_reference_grads(grad_ref_ptr, bqh, 0, q_mask, g_ref_x, g_ref_y, g_ref_w, g_ref_h, R, K)
        # Softmax backward: grad_logit = w * (grad_w - sum_j w_j grad_w_j).
        tl.debug_barrier()
        for p in tl.range(0, P):
            point = bqh * P + p
            w = tl.exp(tl.load(weight_ptr + point, mask=q_mask, other=0.0).to(ACC) - largest) / total
            grad_w = tl.load(grad_weight_ptr + point, mask=q_mask, other=0.0)
            tl.store(grad_weight_ptr + point, w * (grad_w - expected), mask=q_mask)


# Three configurations: small programs for small batches (RT-DETRv2 at batch 1 has 8 * 300 query-heads, 150
# programs of 16 for 132 SMs), larger ones for training batches. Each costs one compile per key at the
# first call (docs/semantics.md has the times); which of them wins on which GPU is measured by
# bench/gpu_check.py, not yet on a GPU.
_TUNING = [
    triton.Config({"BLOCK_Q": block_q}, num_warps=warps)
    for block_q, warps in ((16, 2), (32, 4), (64, 4))
]
_forward_tuned = triton.autotune(_TUNING, key=["C", "H", "P", "DISCRETE", "FUSED"])(_forward_kernel)
# Autotuning reruns the kernel; the atomically accumulated buffer must start from zero each time.
_backward_tuned = triton.autotune(_TUNING, key=["C", "H", "P", "DISCRETE", "FUSED"], reset_to_zero=["grad_value_ptr"])(
    _backward_kernel
)
# The interpreter runs one fixed configuration (tuning it would only cost time), and so does a GPU with
# RTDETRV2_TRITON_AUTOTUNE=0 (test runs: every new key would otherwise time five configurations).
_FIXED_BLOCK_Q = 16
AUTOTUNE_ENV = "RTDETRV2_TRITON_AUTOTUNE"


def autotuning() -> bool:
    return not interpreting() and os.environ.get(AUTOTUNE_ENV) != "0"


def _grid(queries: int, batch_heads: int, block_q: int) -> tuple[int]:
    """One program per (batch, head) and block of queries, all on axis 0: CUDA allows 2^31 - 1 blocks there
    but only 65535 on axes 1 and 2, which B * H alone can exceed."""
    programs = batch_heads * triton.cdiv(queries, block_q)
    if programs > 2**31 - 1:
        raise ValueError(f"ms_deform_attn (Triton): B * H * ceil(Q / {block_q}) = {programs} programs exceed "
                         "CUDA's grid limit of 2^31 - 1; split the batch")
    return (programs,)


def _device_guard(device: torch.device):
    """Makes the tensors' GPU the current one for the launch: Triton launches on the current device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(tuned, plain, arguments):
    """Runs a kernel on `arguments` (_kernel_arguments), all passed by name: autotuned, or with the fixed
    configuration."""
    value = arguments["value_ptr"]
    batch_heads = value.shape[0] * arguments["H"]
    with _device_guard(value.device):
        if autotuning():
            tuned[lambda meta: _grid(arguments["Q"], batch_heads, meta["BLOCK_Q"])](**arguments)
        else:
            plain[_grid(arguments["Q"], batch_heads, _FIXED_BLOCK_Q)](**arguments, BLOCK_Q=_FIXED_BLOCK_Q,
                                                                       num_warps=2)


def _offset_scale_parts(offset_scale: float) -> tuple[float, float, float]:
    """offset_scale as three fp32 values that sum to it exactly. On a GPU a Python float argument arrives as
    fp32; the kernels add the parts in their accumulation dtype, so fp64 runs see the exact double."""
    parts = []
    rest = float(offset_scale)
    for _ in range(3):
        part = struct.unpack("f", struct.pack("f", rest))[0]  # rounded to the nearest fp32
        parts.append(part)
        rest -= part  # exact in double arithmetic
    if rest != 0.0:
        raise ValueError(f"offset_scale={offset_scale!r} is outside what the Triton kernels represent exactly")
    return tuple(parts)


def _alert_not_deterministic(op: str) -> None:
    """What PyTorch's own nondeterministic CUDA ops do under torch.use_deterministic_algorithms(True): raise,
    or only warn with warn_only=True. grad_value's atomic adds land in a different order on each run."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"rtdetrv2_kernels: {op} (Triton) adds into grad_value with atomics and is not deterministic; "
               "the 'cuda' backend has a deterministic mode (docs/semantics.md)")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


_LEVEL_TABLES: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}


def _level_table(spatial_shapes, device: torch.device) -> torch.Tensor:
    """int32 [height, width, first row] per level, then the row count S: what the kernels read at run time.
    One small tensor per (device, level shapes), made once: multi-scale training has a handful."""
    key = (device, tuple(int(s) for s in spatial_shapes))
    table = _LEVEL_TABLES.get(key)
    if table is not None:
        return table
    values, rows = [], 0
    for height, width in zip(key[1][0::2], key[1][1::2]):
        values += [height, width, rows]
        rows += height * width
    values.append(rows)
    if rows > 2**31 - 1:
        raise ValueError(f"ms_deform_attn (Triton): the levels hold {rows} rows; at most 2^31 - 1 are supported")
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # A copy from the host cannot be captured; fills can. Replays refill this graph-owned table.
        table = torch.empty(len(values), dtype=torch.int32, device=device)
        for index, number in enumerate(values):
            table[index].fill_(number)
        return table
    # A blocking copy, once per level shapes: the table is then complete for every stream that reads it.
    table = torch.tensor(values, dtype=torch.int32).to(device)
    _LEVEL_TABLES[key] = table
    return table


def _kernel_arguments(value, spatial_shapes, num_points, method, reference=None, offset_scale=0.0, **tensors):
    """A launch's arguments keyed by the kernels' parameter names, all but BLOCK_Q (the launch's): `tensors`,
    the kernel's own (loc_ptr, weight_ptr, out_ptr; the backward's grad_*_ptr), then value with its strides, the
    level table, the fused op's reference points and offset scale, and the compile-time constants (everything
    but the level shapes, which the table carries). Named, so a change of the kernels' signatures cannot shift
    an argument into another's place (tests/op/test_triton_compile.py compares the names with the kernels')."""
    if reference is None:
        # The plain op: FUSED=False compiles out every read of the fused op's parameters. Any tensor fills a
        # pointer; value and (in the backward) grad_value are at hand.
        fused = dict(ref_ptr=value, scale_hi=0.0, scale_mid=0.0, scale_lo=0.0)
        if "grad_value_ptr" in tensors:
            fused["grad_ref_ptr"] = tensors["grad_value_ptr"]
    else:
        fused = dict(zip(("scale_hi", "scale_mid", "scale_lo"), _offset_scale_parts(offset_scale)), ref_ptr=reference)
    points = tuple(int(p) for p in num_points)
    first_point = [0]
    for count in points:
        first_point.append(first_point[-1] + count)
    return dict(
        tensors, **fused, value_ptr=value, levels_ptr=_level_table(spatial_shapes, value.device),
        Q=tensors["loc_ptr"].shape[1], stride_vb=value.stride(0), stride_vs=value.stride(1), stride_vh=value.stride(2),
        H=value.shape[2], C=value.shape[3], P=first_point[-1], POINTS=points, FIRST_POINT=tuple(first_point),
        NUM_LEVELS=len(points), DISCRETE=method == "discrete",
        ACC=tl.float64 if value.dtype == torch.float64 else tl.float32,
        FUSED=reference is not None,
        R=1 if reference is None else reference.shape[2],
        K=2 if reference is None else reference.shape[3],
        BLOCK_C=triton.next_power_of_2(max(1, value.shape[3])),
    )


def _check_op_inputs(value, spatial_shapes, locations, weights, num_points, method, reference=None,
                     grad_output=None):
    """What keeps a direct call of an op (torch.ops.rtdetrv2_kernels.triton_*: users, opcheck, the autograd
    backward) from launching a kernel that reads or writes outside its tensors, as csrc/ms_deform_attn.h does
    for the C++ ops. Sizes, dtypes and devices only, a few microseconds: the public functions have run
    _validation's checks before (friendlier messages, every argument form), and the op's schema has typed the
    arguments."""
    if reference is None:
        names = ("sampling_locations", "attention_weights")
    else:
        names = ("sampling_offsets", "attention_logits")
    levels = len(spatial_shapes) // 2
    if not levels or len(spatial_shapes) != 2 * levels or len(num_points) != levels:
        raise ValueError(f"spatial_shapes must be (height, width) pairs, flattened, and num_points one count per "
                         f"level; got {list(spatial_shapes)} and {list(num_points)}")
    if min(spatial_shapes) <= 0 or min(num_points) <= 0:
        raise ValueError(f"level sizes and point counts must be positive, got spatial_shapes {list(spatial_shapes)} "
                         f"and num_points {list(num_points)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if value.dim() != 4:
        raise ValueError(f"value must have shape (B, S, H, C), got {tuple(value.shape)}")
    others = {names[0]: locations, names[1]: weights}
    if reference is not None:
        others["reference_points"] = reference
    check_dtypes_and_devices(value, others)
    batch, rows, heads, channels = value.shape
    level_rows = sum(h * w for h, w in zip(spatial_shapes[0::2], spatial_shapes[1::2]))
    if rows != level_rows:
        raise ValueError(f"value has S={rows} rows but spatial_shapes {list(spatial_shapes)} sum to {level_rows}")
    total = sum(num_points)
    queries = locations.shape[1] if locations.dim() == 5 else None
    if locations.shape != (batch, queries, heads, total, 2):
        raise ValueError(f"{names[0]} must have shape (B, Q, H, P, 2) = ({batch}, Q, {heads}, {total}, 2), got "
                         f"{tuple(locations.shape)}")
    if weights.shape != (batch, queries, heads, total):
        raise ValueError(f"{names[1]} must have shape (B, Q, H, P) = {(batch, queries, heads, total)}, got "
                         f"{tuple(weights.shape)}")
    if reference is not None and (reference.dim() != 4 or reference.shape[:2] != (batch, queries)
                                  or reference.shape[2] not in (1, levels) or reference.shape[3] not in (2, 4)):
        raise ValueError(f"reference_points must have shape (B, Q, 1 or L, 4 or 2) with B={batch}, Q={queries}, "
                         f"L={levels}; got {tuple(reference.shape)}")
    # The kernels load grad_output in its own dtype: only its size and device matter.
    if grad_output is not None and (grad_output.shape != (batch, queries, heads * channels)
                                    or grad_output.device != value.device):
        raise ValueError(f"grad_output must have shape (B, Q, H*C) = {(batch, queries, heads * channels)} on "
                         f"{value.device}, got {tuple(grad_output.shape)} on {grad_output.device}")


def _prepare(value, spatial_shapes, sampling_locations, attention_weights, num_points, method, grad_output=None):
    _check_op_inputs(value, spatial_shapes, sampling_locations, attention_weights, num_points, method,
                     grad_output=grad_output)
    if value.stride(3) != 1:
        value = value.contiguous()
    return value, sampling_locations.contiguous(), attention_weights.contiguous()


@torch.library.custom_op("rtdetrv2_kernels::triton_ms_deform_attn_forward", mutates_args=())
def triton_ms_deform_attn_forward(
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points: list[int],
    method: str,
) -> torch.Tensor:
    value, locations, weights = _prepare(value, spatial_shapes, sampling_locations, attention_weights,
                                         num_points, method)
    batch, _, heads, channels = value.shape
    output = torch.empty(batch, locations.shape[1], heads * channels, device=value.device, dtype=value.dtype)
    if output.numel():
        _launch(_forward_tuned, _forward_kernel, _kernel_arguments(
            value, spatial_shapes, num_points, method, loc_ptr=locations, weight_ptr=weights, out_ptr=output))
    return output




@torch.library.custom_op("rtdetrv2_kernels::triton_ms_deform_attn_backward", mutates_args=())
def triton_ms_deform_attn_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points: list[int],
    method: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _alert_not_deterministic("the backward of ms_deform_attn")
    value, locations, weights = _prepare(value, spatial_shapes, sampling_locations, attention_weights,
                                         num_points, method, grad_output)
    accumulate_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, device=value.device, dtype=accumulate_dtype)
    grad_locations = torch.empty_like(locations)
    grad_weights = torch.empty_like(weights)
    if grad_weights.numel() and value.shape[3]:
        _launch(_backward_tuned, _backward_kernel, _kernel_arguments(
            value, spatial_shapes, num_points, method, grad_out_ptr=grad_output.contiguous(), loc_ptr=locations,
            weight_ptr=weights, grad_value_ptr=grad_value, grad_loc_ptr=grad_locations, grad_weight_ptr=grad_weights))
    else:
        grad_locations.zero_()
        grad_weights.zero_()
    return grad_value.to(value.dtype), grad_locations, grad_weights


register_fakes(triton_ms_deform_attn_forward, triton_ms_deform_attn_backward)
register_autograd(triton_ms_deform_attn_forward, triton_ms_deform_attn_backward, plain_reference)


# ------------------------------------------------------------------------------------------ the fused op
def _prepare_fused(value, spatial_shapes, reference_points, sampling_offsets, attention_logits, num_points,
                   method, grad_output=None):
    _check_op_inputs(value, spatial_shapes, sampling_offsets, attention_logits, num_points, method,
                     reference_points, grad_output)
    if value.stride(3) != 1:
        value = value.contiguous()
    return value, reference_points.contiguous(), sampling_offsets.contiguous(), attention_logits.contiguous()


@torch.library.custom_op("rtdetrv2_kernels::triton_ms_deform_attn_fused_forward", mutates_args=())
def triton_ms_deform_attn_fused_forward(
    value: torch.Tensor,
    spatial_shapes: list[int],
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
    num_points: list[int],
    offset_scale: float,
    method: str,
) -> torch.Tensor:
    value, reference, offsets, logits = _prepare_fused(value, spatial_shapes, reference_points, sampling_offsets,
                                                       attention_logits, num_points, method)
    batch, _, heads, channels = value.shape
    output = torch.empty(batch, offsets.shape[1], heads * channels, device=value.device, dtype=value.dtype)
    if output.numel():
        _launch(_forward_tuned, _forward_kernel, _kernel_arguments(
            value, spatial_shapes, num_points, method, reference, offset_scale, loc_ptr=offsets, weight_ptr=logits,
            out_ptr=output))
    return output




@torch.library.custom_op("rtdetrv2_kernels::triton_ms_deform_attn_fused_backward", mutates_args=())
def triton_ms_deform_attn_fused_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: list[int],
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
    num_points: list[int],
    offset_scale: float,
    method: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _alert_not_deterministic("the backward of ms_deform_attn_fused")
    value, reference, offsets, logits = _prepare_fused(value, spatial_shapes, reference_points, sampling_offsets,
                                                       attention_logits, num_points, method, grad_output)
    batch, _, heads, channels = value.shape
    queries = offsets.shape[1]
    accumulate_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, device=value.device, dtype=accumulate_dtype)
    # Each head's share of the reference gradient (summed over heads below), and the logits' gradient in
    # the accumulation dtype: the kernel keeps the raw weight gradient there until its softmax pass.
    grad_reference = torch.zeros(batch, queries, heads, *reference.shape[2:], device=value.device,
                                 dtype=accumulate_dtype)
    grad_offsets = torch.zeros_like(offsets)
    grad_logits = torch.zeros(logits.shape, device=value.device, dtype=accumulate_dtype)
    if grad_logits.numel() and channels:
        _launch(_backward_tuned, _backward_kernel, _kernel_arguments(
            value, spatial_shapes, num_points, method, reference, offset_scale, grad_out_ptr=grad_output.contiguous(),
            loc_ptr=offsets, weight_ptr=logits, grad_value_ptr=grad_value, grad_loc_ptr=grad_offsets,
            grad_weight_ptr=grad_logits, grad_ref_ptr=grad_reference))
    return (grad_value.to(value.dtype), grad_reference.sum(2).to(value.dtype), grad_offsets,
            grad_logits.to(value.dtype))


register_fakes(triton_ms_deform_attn_fused_forward, triton_ms_deform_attn_fused_backward)
register_autograd(triton_ms_deform_attn_fused_forward, triton_ms_deform_attn_fused_backward, fused_reference)
