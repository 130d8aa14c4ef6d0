"""The drop-in adapters of rtdetrv2_kernels.compat against independent implementations of each layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, backend_params, make_inputs, run_with_grads, tensor_level_params
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import rtdetrv2_kernels
from rtdetrv2_kernels import compat
from rtdetrv2_kernels.reference import levels_in_order

SHAPES = [(4, 8), (8, 2), (3, 5)]  # W > H, H > W, odd sizes
SIZES = [h * w for h, w in SHAPES]


# ---------------------------------------------------------------------------------------------------------
# Independent oracles, written from the published algorithms.
# ---------------------------------------------------------------------------------------------------------


def v1_oracle(value, shapes, starts, locations, weights):
    """Deformable DETR's layout by grid_sample: level l is value[:, starts[l] : starts[l] + H_l*W_l]."""
    batch, _, heads, channels = value.shape
    queries, points = locations.shape[1], locations.shape[4]
    total = 0
    for level, ((height, width), start) in enumerate(zip(shapes, starts)):
        image = value[:, start : start + height * width]  # (B, hw, H, C)
        image = image.permute(0, 2, 3, 1).reshape(batch * heads, channels, height, width)
        grid = 2 * locations[:, :, :, level] - 1  # (B, Q, H, P, 2)
        grid = grid.permute(0, 2, 1, 3, 4).reshape(batch * heads, queries, points, 2)
        sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weight = weights[:, :, :, level].permute(0, 2, 1, 3).reshape(batch * heads, 1, queries, points)
        total = total + (sampled * weight).sum(-1)  # (B*H, C, Q)
    return total.reshape(batch, heads * channels, queries).transpose(1, 2)


def original_v2(value_levels, shapes, locations, weights, num_points, method):
    """The original RT-DETRv2 / D-FINE core: value as per-level (B*H, C, H_l, W_l) images; "discrete" rounds
    x * W + 0.5 toward zero to int64 and clamps both coordinates to H_l - 1."""
    batch, queries, heads = locations.shape[:3]
    per_level_locations = locations.transpose(1, 2).reshape(batch * heads, queries, -1, 2).split(num_points, 2)
    outputs = []
    for (height, width), image, loc, count in zip(shapes, value_levels, per_level_locations, num_points):
        if method == "default":
            outputs.append(F.grid_sample(image, 2 * loc - 1, mode="bilinear", padding_mode="zeros",
                                         align_corners=False))
            continue
        pixel = (loc * torch.tensor([width, height], dtype=loc.dtype) + 0.5).to(torch.int64).clamp(0, height - 1)
        pixel = pixel.reshape(batch * heads, queries * count, 2)
        rows = torch.arange(batch * heads)[:, None].expand(-1, queries * count)
        picked = image[rows, :, pixel[..., 1], pixel[..., 0]]  # (B*H, Q*count, C)
        outputs.append(picked.transpose(1, 2).reshape(batch * heads, -1, queries, count))
    weight = weights.transpose(1, 2).reshape(batch * heads, 1, queries, -1)
    output = (torch.cat(outputs, -1) * weight).sum(-1)
    return output.reshape(batch, -1, queries).transpose(1, 2)


def rtdetrv2_levels(value, shapes):
    """RT-DETRv2's per-level images from (B, S, H, C)."""
    batch, _, heads, channels = value.shape
    flat = value.permute(0, 2, 3, 1).reshape(batch * heads, channels, -1)
    return [x.reshape(batch * heads, channels, h, w) for x, (h, w) in zip(flat.split([h * w for h, w in shapes], -1), shapes)]


def dfine_value(memory, heads, shapes):
    """D-FINE's decoder input: memory (B, S, D) as per-level (B, H, C, H_l*W_l) views."""
    value = memory.reshape(memory.shape[0], memory.shape[1], heads, -1).permute(0, 2, 3, 1)
    return value.split([h * w for h, w in shapes], dim=-1)


def v1_inputs(batch=2, queries=5, heads=3, channels=4, points=2, shapes=SHAPES, padding=0, seed=0,
              dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    rows = sum(h * w for h, w in shapes) + padding
    value = torch.randn(batch, rows, heads, channels, generator=generator, dtype=dtype)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator, dtype=dtype)
    locations = locations * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator, dtype=dtype)
    return value, locations, weights


def cumulative(sizes):
    return [sum(sizes[:i]) for i in range(len(sizes))]


# ---------------------------------------------------------------------------------------------------------
# Deformable DETR / mmcv layout
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", backend_params())
def test_v1_matches_grid_sample_oracle(backend, device):
    value, locations, weights = (t.to(device) for t in v1_inputs())
    spatial_shapes = torch.tensor(SHAPES, device=device)
    starts = torch.tensor(cumulative(SIZES), device=device)
    expected = run_with_grads(lambda v, l, w: v1_oracle(v, SHAPES, cumulative(SIZES), l, w),
                              value, locations, weights)
    actual = run_with_grads(lambda v, l, w: compat.ms_deform_attn_v1(v, spatial_shapes, starts, l, w, backend=backend),
                            value, locations, weights)
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
        assert_close(a, e, torch.float64, name)


def distance_to_knots(locations, shapes):
    """Per entry, how far (in pixels) a v1-layout location lies from the nearest integer pixel coordinate,
    where the bilinear interpolant has a kink and its derivative is one-sided."""
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=locations.dtype)[:, None, :]  # (L, 1, 2)
    pixel = locations * sizes - 0.5
    return (pixel - pixel.round()).abs()


def test_v1_oracle_comparison_is_away_from_knots():
    # Where test_v1_matches_grid_sample_oracle compares location gradients exactly: no point near a kink.
    assert distance_to_knots(v1_inputs()[1], SHAPES).min() > 1e-4


@pytest.mark.parametrize("backend,device", backend_params())
def test_v1_at_pixel_knots_location_gradients_are_one_sided(backend, device):
    """Deformable DETR's initial offsets: whole pixels from pixel-centre references, so every point sits
    within rounding of a kink. Outputs and the value and weight gradients agree as anywhere; a location
    gradient is the derivative from one side or the other (which side depends on how each implementation
    rounds loc * W - 0.5), so each entry must equal one of the two one-sided derivatives."""
    value, _, weights = v1_inputs()
    batch, queries, heads, levels, points = weights.shape
    generator = torch.Generator().manual_seed(4)
    sizes = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32)[:, None, :]  # (L, 1, 2)
    centres = (torch.randint(0, 2, (batch, queries, heads, levels, 1, 2), generator=generator) + 0.5) / sizes
    shifts = torch.randint(-2, 3, (batch, queries, heads, levels, points, 2), generator=generator)
    locations = (centres + shifts / sizes).double()  # rounded in fp32, as Deformable DETR computes them
    assert distance_to_knots(locations, SHAPES).max() < 1e-5
    spatial_shapes, starts = torch.tensor(SHAPES, device=device), torch.tensor(cumulative(SIZES), device=device)

    def oracle(v, l, w):
        return v1_oracle(v, SHAPES, cumulative(SIZES), l, w)

    actual = run_with_grads(lambda v, l, w: compat.ms_deform_attn_v1(v, spatial_shapes, starts, l, w, backend=backend),
                            *(t.to(device) for t in (value, locations, weights)))
    expected = run_with_grads(oracle, value, locations, weights)
    for index, name in ((0, "output"), (1, "grad_value"), (3, "grad_weights")):
        assert_close(actual[index], expected[index], torch.float64, name)
    # The derivative from either side along each axis: the oracle a hundredth of a pixel off the knot along
    # that axis alone (the interpolant is linear in x within a cell, whatever y's side, and vice versa).
    gradient = actual[2].cpu()
    one_sided = []
    for axis in (0, 1):
        step = torch.zeros(2, dtype=torch.float64)
        step[axis] = 0.01
        sides = [run_with_grads(oracle, value, locations + sign * step / sizes.double(), weights)[2][..., axis]
                 for sign in (1, -1)]
        nearest = torch.minimum((gradient[..., axis] - sides[0]).abs(), (gradient[..., axis] - sides[1]).abs())
        assert nearest.max() <= 1e-9 * max(side.abs().max() for side in sides), f"axis {axis}"
        one_sided += sides
    assert not torch.allclose(one_sided[0], one_sided[1])  # the two sides differ: the points are at kinks


# Level 2 first, then level 0, three unused rows, then level 1; and two levels sharing the same rows.
OUT_OF_ORDER = [SIZES[2], SIZES[2] + SIZES[0] + 3, 0]


@pytest.mark.parametrize("as_type", ["tensor", "list"])
@pytest.mark.parametrize("starts", [OUT_OF_ORDER, [0, 0, 0]], ids=["permuted-padded", "overlapping"])
def test_v1_honours_level_start_index(as_type, starts):
    value, locations, weights = v1_inputs(padding=max(SIZES) + 3)
    starts_arg = torch.tensor(starts) if as_type == "tensor" else list(starts)
    expected = run_with_grads(lambda v, l, w: v1_oracle(v, SHAPES, starts, l, w), value, locations, weights)
    actual = run_with_grads(lambda v, l, w: compat.ms_deform_attn_v1(v, SHAPES, starts_arg, l, w),
                            value, locations, weights)
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
        assert_close(a, e, torch.float64, name)
    # The same call with the starts ignored (levels taken in cumulative order) must differ, or the test
    # could not tell.
    ignored = compat.ms_deform_attn_v1(value, SHAPES, cumulative(SIZES), locations, weights)
    assert not torch.allclose(ignored, expected[0])


def test_v1_device_gather_matches_host_reordering():
    """The path for starts left on a GPU (no host sync) builds the same value as the host path. On a
    CPU-only machine it is exercised directly, with CPU tensors."""
    value, _, _ = v1_inputs(padding=max(SIZES) + 3)
    for starts in (OUT_OF_ORDER, [0, 0, 0], cumulative(SIZES)):
        host = levels_in_order(value, SHAPES, starts)
        device = compat._gather_levels_on_device(value, SHAPES, torch.tensor(starts))
        assert torch.equal(host, device)


def test_v1_in_order_levels_are_not_copied():
    value, _, _ = v1_inputs(padding=5)
    ordered = levels_in_order(value, SHAPES, cumulative(SIZES))
    assert ordered.data_ptr() == value.data_ptr() and ordered.shape[1] == sum(SIZES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("shapes_on", ["cuda", "cpu"])
def test_v1_device_starts(shapes_on):
    value, locations, weights = (t.cuda() for t in v1_inputs(padding=max(SIZES) + 3))
    expected = v1_oracle(value, SHAPES, OUT_OF_ORDER, locations, weights)
    actual = compat.ms_deform_attn_v1(value, torch.tensor(SHAPES, device=shapes_on),
                                      torch.tensor(OUT_OF_ORDER, device="cuda"), locations, weights)
    assert_close(actual, expected, torch.float64, "output")


# ---------------------------------------------------------------------------------------------------------
# The level table in tensors, as Deformable DETR passes it (on the GPU): the "cpu" and "cuda" kernels read
# it where it lives.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", tensor_level_params())
@pytest.mark.parametrize("starts", [OUT_OF_ORDER, [0, 0, 0], None], ids=["permuted-padded", "overlapping", "in-order"])
def test_v1_tensor_levels_honour_level_start_index(backend, device, starts):
    padding = 0 if starts is None else max(SIZES) + 3
    starts = cumulative(SIZES) if starts is None else starts
    value, locations, weights = (t.to(device) for t in v1_inputs(padding=padding))
    table = torch.tensor(SHAPES, device=device), torch.tensor(starts, device=device)
    expected = run_with_grads(lambda v, l, w: v1_oracle(v, SHAPES, starts, l, w), value, locations, weights)
    actual = run_with_grads(lambda v, l, w: compat.ms_deform_attn_v1(v, *table, l, w, backend=backend),
                            value, locations, weights)
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
        assert_close(a, e, torch.float64, name)


class _NoHostReads(TorchFunctionMode):
    """Fails on any Python-level read of tensor values on the host (what a GPU call pays a sync for)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__index__,
             torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.numpy, torch.Tensor.cpu}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"a host read of a tensor: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


class _NoScalarReads(TorchDispatchMode):
    """Fails on the aten op behind every C++-side scalar read (item(), a data-dependent int)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a host read of a tensor: aten._local_scalar_dense")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend,device", [p for p in tensor_level_params() if p.values[0] != "cpu"])
def test_v1_tensor_levels_never_read_the_table_on_the_host(backend, device):
    # The CUDA path, forward and backward: nothing reads the table (or any tensor) back to the host, so a GPU
    # call needs no sync and can be captured in a CUDA graph. On a GPU the sync detector also watches.
    value, locations, weights = (t.to(device).requires_grad_() for t in v1_inputs(padding=max(SIZES) + 3))
    table = torch.tensor(SHAPES, device=device), torch.tensor(OUT_OF_ORDER, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with _NoHostReads(), _NoScalarReads():
            output = compat.ms_deform_attn_v1(value, *table, locations, weights, backend=backend)
            output.backward(torch.ones_like(output))
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    expected = v1_oracle(value.detach(), SHAPES, OUT_OF_ORDER, locations.detach(), weights.detach())
    assert_close(output, expected, torch.float64, "output")


@pytest.mark.parametrize("backend,device", tensor_level_params())
@pytest.mark.parametrize("entry", ["MSDeformAttnFunction", "ms_deform_attn_v1"])
def test_v1_tensor_levels_compile_fullgraph(backend, device, entry, monkeypatch):
    # Deformable DETR's call, shapes and starts as tensors: one graph, no "data-dependent expression" error.
    monkeypatch.setenv(rtdetrv2_kernels.ENV_VAR, backend)  # MSDeformAttnFunction.apply has no backend argument
    value, locations, weights = (t.to(device) for t in v1_inputs(padding=max(SIZES) + 3))
    table = torch.tensor(SHAPES, device=device), torch.tensor(OUT_OF_ORDER, device=device)

    def layer(v, shapes, starts, l, w):
        if entry == "MSDeformAttnFunction":
            out = compat.MSDeformAttnFunction.apply(v, shapes, starts, l, w, 64)
        else:
            out = compat.ms_deform_attn_v1(v, shapes, starts, l, w)
        return (out.relu() * 2).sum()

    torch._dynamo.reset()
    # Inductor where it generates code users run; graph capture alone (aot_eager) for the emulated kernels.
    compiler = "aot_eager" if backend.startswith("cuda-emulated") else "inductor"
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    eager_inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    compiled_inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    expected = layer(eager_inputs[0], *table, *eager_inputs[1:])
    actual = compiled(compiled_inputs[0], *table, *compiled_inputs[1:])
    assert_close(actual, expected, torch.float64, "output")
    expected.backward()
    actual.backward()
    for name, a, e in zip(("value", "locations", "weights"), compiled_inputs, eager_inputs):
        assert_close(a.grad, e.grad, torch.float64, f"grad of {name}")


def test_v1_tensor_levels_on_a_host_reading_backend_say_so_under_compile():
    value, locations, weights = v1_inputs()
    table = torch.tensor(SHAPES), torch.tensor(cumulative(SIZES))
    compiled = torch.compile(lambda *args: compat.ms_deform_attn_v1(*args, backend="torch"), fullgraph=True,
                             backend="aot_eager")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="needs a backend whose kernels read it on the device"):
        compiled(value, *table, locations, weights)


# A level table no level of which may be read as given: on the host (CPU tensors) each is an error naming it;
# on the device (CUDA kernels) the kernels cannot raise, and the level reads as empty.
BAD_TABLES = {
    "start-past-the-end": ([SIZES[2], SIZES[2] + SIZES[0] + 3, sum(SIZES) + 60], SHAPES, 2, "level_start_index"),
    "one-row-short": ([0, SIZES[0], SIZES[0] + SIZES[1] + 4], SHAPES, 2, "level_start_index"),
    "negative-start": ([-1, SIZES[0], SIZES[0] + SIZES[1]], SHAPES, 0, "level_start_index"),
    "negative-height": (cumulative(SIZES), [SHAPES[0], (-8, 2), SHAPES[2]], 1, "level 1 has size -8x2"),
    "int32-overflow": (cumulative(SIZES), [SHAPES[0], SHAPES[1], (2**20, 2**12)], 2, "level 2 has size"),
}


@pytest.mark.parametrize("case", BAD_TABLES, ids=list(BAD_TABLES))
@pytest.mark.parametrize("backend,device", tensor_level_params())
def test_v1_tensor_levels_bad_table(backend, device, case):
    starts, shapes, bad_level, message = BAD_TABLES[case]
    value, locations, weights = (t.to(device) for t in v1_inputs(padding=3))
    table = torch.tensor(shapes, device=device), torch.tensor(starts, device=device)
    if device == "cpu" and backend == "cpu":
        with pytest.raises(ValueError, match=message):
            compat.ms_deform_attn_v1(value, *table, locations, weights, backend=backend)
        return
    actual = run_with_grads(lambda v, l, w: compat.ms_deform_attn_v1(v, *table, l, w, backend=backend),
                            value, locations, weights)
    # As if the bad level's weights were zero (its locations and weights then get zero gradients too).
    good = [level for level in range(len(SHAPES)) if level != bad_level]
    keep = torch.zeros(len(SHAPES), 1, dtype=weights.dtype, device=device)
    keep[good] = 1

    def oracle(v, l, w):
        ok_shapes = [shapes[level] if level != bad_level else (1, 1) for level in range(len(SHAPES))]
        ok_starts = [starts[level] if level != bad_level else 0 for level in range(len(SHAPES))]
        return v1_oracle(v, ok_shapes, ok_starts, l, w * keep)

    expected = run_with_grads(oracle, value, locations, weights)
    expected[2] = expected[2] * keep[..., None]
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
        assert_close(a, e, torch.float64, name)


@pytest.mark.parametrize("starts", [None, OUT_OF_ORDER], ids=["in-order", "permuted-padded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_v1_matches_torch_ms_deform_attn(starts, dtype):
    peer = pytest.importorskip("torch_ms_deform_attn")
    padding = 0 if starts is None else max(SIZES) + 3
    starts = torch.tensor(cumulative(SIZES) if starts is None else starts)
    spatial_shapes = torch.tensor(SHAPES)
    inputs = v1_inputs(padding=padding, dtype=dtype, seed=4)
    expected = run_with_grads(lambda v, l, w: peer.ms_deform_attn(v, spatial_shapes, starts, l, w), *inputs)
    actual = run_with_grads(lambda v, l, w: compat.MSDeformAttnFunction.apply(v, spatial_shapes, starts, l, w, 64),
                            *inputs)
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
        assert_close(a, e, dtype, name)


def test_v1_aliases_and_im2col_step():
    value, locations, weights = v1_inputs()
    starts = torch.tensor(cumulative(SIZES))
    a = compat.MSDeformAttnFunction.apply(value, torch.tensor(SHAPES), starts, locations, weights, 1)
    b = compat.MultiScaleDeformableAttnFunction.apply(value, torch.tensor(SHAPES), starts, locations, weights, 128)
    assert torch.equal(a, b)
    assert_close(a, v1_oracle(value, SHAPES, cumulative(SIZES), locations, weights), torch.float64, "output")


def test_mmcv_function_casts_locations_and_weights_to_value_dtype():
    """mmcv's MultiScaleDeformableAttnFunction casts them first; Deformable DETR's (as the op) refuses the mix."""
    value, locations, weights = v1_inputs()
    starts = torch.tensor(cumulative(SIZES))
    value32 = value.float().requires_grad_()
    locations = locations.clone().requires_grad_()
    output = compat.MultiScaleDeformableAttnFunction.apply(value32, torch.tensor(SHAPES), starts, locations, weights, 64)
    assert output.dtype == torch.float32
    expected = v1_oracle(value.float().double(), SHAPES, cumulative(SIZES), locations.float().double(),
                         weights.float().double())
    assert_close(output, expected, torch.float32, "output")
    output.sum().backward()
    assert locations.grad.dtype == torch.float64 and value32.grad is not None
    with pytest.raises(TypeError, match="has dtype torch.float64 but value has torch.float32"):
        compat.MSDeformAttnFunction.apply(value32, torch.tensor(SHAPES), starts, locations, weights, 64)


def test_rtdetr_v1_core():
    """RT-DETR (v1)'s deformable_attention_core_func: Deformable DETR's locations, levels back to back."""
    value, locations, weights = v1_inputs()
    expected = run_with_grads(lambda v, l, w: v1_oracle(v, SHAPES, cumulative(SIZES), l, w), value, locations, weights)
    for shapes in (SHAPES, torch.tensor(SHAPES)):
        actual = run_with_grads(lambda v, l, w: compat.deformable_attention_core_func(v, shapes, l, w),
                                value, locations, weights)
        for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
            assert_close(a, e, torch.float64, name)
    with pytest.raises(ValueError, match=r"sampling_locations must have shape \(B, Q, H, L, P, 2\)"):
        compat.deformable_attention_core_func(value, SHAPES, locations.flatten(3, 4), weights)


def test_v1_rejects_bad_arguments():
    value, locations, weights = v1_inputs()
    starts = cumulative(SIZES)
    with pytest.raises(ValueError, match="sampling_locations"):
        compat.ms_deform_attn_v1(value, SHAPES, starts, locations.flatten(3, 4), weights)
    with pytest.raises(ValueError, match="attention_weights"):
        compat.ms_deform_attn_v1(value, SHAPES, starts, locations, weights[..., :1])
    with pytest.raises(ValueError, match="sampling_locations"):  # L of the locations != number of levels
        compat.ms_deform_attn_v1(value, SHAPES[:2], starts[:2], locations, weights)
    with pytest.raises(ValueError, match="level_start_index has 2 entries"):
        compat.ms_deform_attn_v1(value, SHAPES, starts[:2], locations, weights)
    with pytest.raises(ValueError, match=r"level_start_index\[1\]"):
        compat.ms_deform_attn_v1(value, SHAPES, [0, sum(SIZES), 0], locations, weights)
    with pytest.raises(ValueError, match=r"level_start_index\[0\]"):
        compat.ms_deform_attn_v1(value, SHAPES, [-1, 0, 0], locations, weights)
    with pytest.raises(TypeError, match="level_start_index"):
        compat.ms_deform_attn_v1(value, SHAPES, torch.tensor(starts, dtype=torch.float32), locations, weights)
    with pytest.raises(TypeError, match="level_start_index"):
        compat.ms_deform_attn_v1(value, SHAPES, 0, locations, weights)
    with pytest.raises(TypeError, match="value"):
        compat.ms_deform_attn_v1(value.numpy(), SHAPES, starts, locations, weights)


# ---------------------------------------------------------------------------------------------------------
# RT-DETRv2 / D-FINE / DEIM core
# ---------------------------------------------------------------------------------------------------------

# Levels no taller than wide: there the original discrete sampling is defined (it reads past the row of a
# taller one). (4, 8) is wider than tall, where its clamp of x to H_l - 1 matters.
V2_SHAPES = [(4, 8), (3, 5), (2, 2)]
V2_POINTS = [3, 6, 3]


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("seed", [0, 1])
def test_core_v2_matches_original_rtdetrv2(method, seed):
    inputs = make_inputs(batch=2, queries=6, heads=2, channels=4, shapes=V2_SHAPES, points=V2_POINTS, seed=seed)
    expected = run_with_grads(
        lambda v, l, w: original_v2(rtdetrv2_levels(v, V2_SHAPES), V2_SHAPES, l, w, V2_POINTS, method), *inputs
    )
    actual = run_with_grads(
        lambda v, l, w: compat.deformable_attention_core_func_v2(v, V2_SHAPES, l, w, V2_POINTS, method), *inputs
    )
    names = ("output", "grad_value", "grad_locations", "grad_weights")
    for name, a, e in zip(names, actual, expected):
        if method == "discrete" and name == "grad_locations":
            assert a is None and e is None  # rounding to pixels passes no gradient, in the original and here
            continue
        assert_close(a, e, torch.float64, name)


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_core_v2_matches_original_dfine_per_level_value(method):
    heads, channels = 2, 4
    _, locations, weights = make_inputs(batch=2, queries=6, heads=heads, channels=channels, shapes=V2_SHAPES,
                                        points=V2_POINTS, seed=2)
    memory = torch.randn(2, sum(h * w for h, w in V2_SHAPES), heads * channels, dtype=torch.float64)

    def original(memory, locations, weights):
        levels = [x.reshape(-1, channels, h, w) for x, (h, w) in zip(dfine_value(memory, heads, V2_SHAPES), V2_SHAPES)]
        return original_v2(levels, V2_SHAPES, locations, weights, V2_POINTS, method)

    def ours(memory, locations, weights):
        value = dfine_value(memory, heads, V2_SHAPES)
        return compat.deformable_attention_core_func_v2(value, V2_SHAPES, locations, weights, V2_POINTS, method=method)

    expected = run_with_grads(original, memory, locations, weights)
    actual = run_with_grads(ours, memory, locations, weights)
    for name, a, e in zip(("output", "grad_memory", "grad_locations", "grad_weights"), actual, expected):
        if method == "discrete" and name == "grad_locations":
            assert a is None and e is None  # as in test_core_v2_matches_original_rtdetrv2
        else:
            assert_close(a, e, torch.float64, name)


def test_core_v2_discrete_clamp_choice_matters_on_wide_levels():
    """With x locations past H_l - 1 pixels on the wide level, the original's clamp and the per-axis clamp
    read different pixels; original_discrete_clamp picks which."""
    value, locations, weights = make_inputs(batch=1, queries=8, heads=2, channels=3, shapes=V2_SHAPES,
                                            points=V2_POINTS, borders=False, seed=5)
    locations[..., :3, 0] = torch.linspace(0.3, 1.2, 8, dtype=torch.float64)[None, :, None, None]
    original = original_v2(rtdetrv2_levels(value, V2_SHAPES), V2_SHAPES, locations, weights, V2_POINTS, "discrete")
    faithful = compat.deformable_attention_core_func_v2(value, V2_SHAPES, locations, weights, V2_POINTS, "discrete")
    per_axis = compat.deformable_attention_core_func_v2(value, V2_SHAPES, locations, weights, V2_POINTS, "discrete",
                                                        original_discrete_clamp=False)
    assert_close(faithful, original, torch.float64, "original clamp")
    assert_close(per_axis, rtdetrv2_kernels.ms_deform_attn(value, V2_SHAPES, locations, weights, V2_POINTS,
                                                           "discrete"), torch.float64, "per-axis clamp")
    assert not torch.allclose(per_axis, original)


def test_core_v2_rejects_bad_value():
    _, locations, weights = make_inputs(batch=1, queries=2, heads=2, channels=3, shapes=V2_SHAPES, points=V2_POINTS)
    memory = torch.randn(1, sum(h * w for h, w in V2_SHAPES), 6, dtype=torch.float64)
    levels = list(dfine_value(memory, 2, V2_SHAPES))
    with pytest.raises(ValueError, match="value has 2 levels"):
        compat.deformable_attention_core_func_v2(levels[:2], V2_SHAPES, locations, weights, V2_POINTS)
    with pytest.raises(ValueError, match=r"value\[1\]"):
        compat.deformable_attention_core_func_v2([levels[0], levels[0], levels[2]], V2_SHAPES, locations, weights,
                                                 V2_POINTS)
    with pytest.raises(TypeError, match="value"):
        compat.deformable_attention_core_func_v2(memory.numpy(), V2_SHAPES, locations, weights, V2_POINTS)
    with pytest.raises(ValueError, match="method"):
        compat.deformable_attention_core_func_v2(levels, V2_SHAPES, locations, weights, V2_POINTS, "nearest")


def test_core_v2_value_shape_as_deim_passes_it():
    """DEIM's value_shape: "default" with per-level value tensors, "reshape" with one (B, S, H, C) tensor."""
    heads, channels = 2, 4
    value, locations, weights = make_inputs(batch=2, queries=6, heads=heads, channels=channels, shapes=V2_SHAPES,
                                            points=V2_POINTS, seed=3)
    levels = [level.permute(0, 2, 3, 1) for level in value.split([h * w for h, w in V2_SHAPES], dim=1)]
    expected = compat.deformable_attention_core_func_v2(value, V2_SHAPES, locations, weights, V2_POINTS)
    assert torch.equal(compat.deformable_attention_core_func_v2(value, V2_SHAPES, locations, weights, V2_POINTS,
                                                                "default", "reshape"), expected)
    assert_close(compat.deformable_attention_core_func_v2(levels, V2_SHAPES, locations, weights, V2_POINTS,
                                                          value_shape="default"), expected, torch.float64, "levels")
    with pytest.raises(TypeError, match="value_shape='default' needs value as a sequence"):
        compat.deformable_attention_core_func_v2(value, V2_SHAPES, locations, weights, V2_POINTS, value_shape="default")
    with pytest.raises(TypeError, match="value_shape='reshape' needs value as one"):
        compat.deformable_attention_core_func_v2(levels, V2_SHAPES, locations, weights, V2_POINTS, value_shape="reshape")
    with pytest.raises(ValueError, match="value_shape must be"):
        compat.deformable_attention_core_func_v2(value, V2_SHAPES, locations, weights, V2_POINTS, value_shape="flat")


def test_core_v2_bilinear_gather_is_bilinear():
    """lightly-train's third method: bilinear sampling written as corner gathers, the same values."""
    inputs = make_inputs(batch=2, queries=6, heads=2, channels=4, shapes=V2_SHAPES, points=V2_POINTS, seed=6)
    expected = run_with_grads(
        lambda v, l, w: original_v2(rtdetrv2_levels(v, V2_SHAPES), V2_SHAPES, l, w, V2_POINTS, "default"), *inputs)
    actual = run_with_grads(lambda v, l, w: compat.deformable_attention_core_func_v2(
        v, V2_SHAPES, l, w, V2_POINTS, "bilinear_gather"), *inputs)
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
        assert_close(a, e, torch.float64, name)
