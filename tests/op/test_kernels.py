"""Every backend against the fp64 PyTorch reference, forward and all gradients. The "torch" backend is the
reference itself; running it here too checks its low-precision path against its fp64 one."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    FAMILY_HEAD_SIZES,
    FLAT_SHAPES,
    GPU_KERNELS,
    POINTS,
    SHAPES,
    assert_close,
    backend_params,
    backends_for,
    make_fused_inputs,
    make_inputs,
    needs_cpu_kernels,
    needs_gpu_kernels,
    run_with_grads,
    torch_threads,
)

import rtdetrv2_kernels
from rtdetrv2_kernels import ms_deform_attn, ms_deform_attn_fused, ms_deform_attn_reference

METHODS = ["default", "discrete"]
NAMES = ("output", "grad_value", "grad_locations", "grad_weights")
BACKENDS = backend_params()
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def check_against_reference(backend, device, dtype, method, shapes=SHAPES, points=POINTS, **shape):
    inputs = make_inputs(shapes=shapes, points=points, dtype=dtype, device=device, **shape)
    # The expectation: fp64 reference on the very same (already rounded) inputs.
    expected = run_with_grads(
        lambda v, l, w: ms_deform_attn_reference(v, shapes, l, w, points, method), *(t.double().cpu() for t in inputs)
    )
    actual = run_with_grads(lambda v, l, w: ms_deform_attn(v, shapes, l, w, points, method, backend=backend), *inputs)
    assert actual[0].dtype == dtype and actual[0].device.type == device
    for name, a, e in zip(NAMES, actual, expected):
        assert a.dtype == dtype, name
        assert_close(a, e, dtype, f"{backend} {name}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference(backend, device, dtype, method):
    check_against_reference(backend, device, dtype, method)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shapes,points,heads,channels",
    [
        ([(7, 3)], [1], 1, 1),  # one level, one point, H = 1, C = 1
        ([(4, 8), (8, 2)], 2, 8, 32),  # an int num_points; H = 8 and the C = 32 fast path
        ([(6, 10), (3, 5), (2, 3), (1, 2)], [1, 3, 2, 4], 2, 64),  # L = 4, C = 64
        ([(5, 4), (3, 3), (2, 2)], [3, 6, 3], 3, 48),  # D-FINE points, C = 48 (not a multiple of 32)
        ([(2, 3)] * 8, [2] * 8, 2, 9),  # L = 8
    ],
)
def test_shapes(backend, device, method, shapes, points, heads, channels):
    points_list = points if isinstance(points, list) else [points] * len(shapes)
    inputs = make_inputs(batch=2, queries=4, heads=heads, channels=channels, shapes=shapes, points=points_list,
                         device=device)
    expected = run_with_grads(lambda v, l, w: ms_deform_attn_reference(v, shapes, l, w, points_list, method),
                              *(t.cpu() for t in inputs))
    actual = run_with_grads(lambda v, l, w: ms_deform_attn(v, shapes, l, w, points, method, backend=backend), *inputs)
    for name, a, e in zip(NAMES, actual, expected):
        assert_close(a, e, torch.float64, name)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("channels", FAMILY_HEAD_SIZES)
def test_family_head_sizes(backend, device, method, channels):
    # Every kernel (the CUDA ones emulated, Triton's in its interpreter) at each head size of the family, in
    # fp32: vector widths that do and do not divide C.
    check_against_reference(backend, device, torch.float32, method, batch=1, queries=3, heads=2, channels=channels)


@needs_cpu_kernels
@pytest.mark.parametrize("channels", [1, 2, 4, 6, 8, 9, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64, 72])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_cpu_channel_counts(channels, dtype, method):
    # The CPU backward keeps a query's grad_output in registers when C is known at compile time (the family's
    # head sizes 8, 12, 14, 16, 24, 28, 32, and 48, 64) and reads it from memory otherwise; both passes take
    # whole SIMD vectors of 32 bytes first, then a half vector (16 bytes), then the rest channel by channel:
    # each of those paths, in each dtype (fp16 and bf16 accumulate in fp32), against the reference.
    check_against_reference("cpu", "cpu", dtype, method, batch=1, queries=3, heads=2, channels=channels)


@needs_cpu_kernels
@pytest.mark.parametrize("method", METHODS)
def test_cpu_forward_walks_the_heads_of_each_query_where_inputs_outgrow_the_l2(method):
    # A small value and more per-query inputs than a core's L2 (2 MiB) holds: the forward walks the heads of
    # each query innermost (csrc/cpu: walk_heads_innermost), not head by head, where it does not sample a staged
    # copy of each head (48 channels are more than a staged row holds in registers; 16, RF-DETR's training
    # shapes, stage). Two threads split its 3 x 1001 x 16 tasks mid-batch and mid-query (at batch 1, query 500,
    # head 8).
    shapes, points = [(9, 11), (5, 6)], [2, 1]
    with torch_threads(2):
        check_against_reference("cpu", "cpu", torch.float64, method, shapes=shapes, points=points, batch=3,
                                queries=1001, heads=16, channels=48)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_staged_forward_split_between_threads_mid_head(dtype):
    # Three threads split these 2 x 3 x 45 tasks (8 channels: a grain of 93) at batch 0, head 2, query 3 and at
    # batch 1, head 1, query 6, so two threads start staging mid-head (csrc/cpu: StagedHead); 45 queries read
    # each row 31 times, which stages. The result must not depend on the split.
    inputs = make_inputs(batch=2, queries=45, heads=3, channels=8, dtype=dtype)
    outputs = []
    for count in (1, 3):
        with torch_threads(count), torch.no_grad():
            outputs.append(ms_deform_attn(inputs[0], SHAPES, *inputs[1:], POINTS, backend="cpu"))
    assert torch.equal(outputs[0], outputs[1])
    expected = ms_deform_attn_reference(inputs[0].double(), SHAPES, *(t.double() for t in inputs[1:]), POINTS)
    assert_close(outputs[1], expected, dtype, "output")


def bits_with_nan_positions(tensor):
    """The tensor's bit patterns, with every NaN's replaced by one marker (a NaN's payload may depend on
    which operand an instruction took it from), for comparing results bit for bit."""
    integers = {8: torch.int64, 4: torch.int32, 2: torch.int16}[tensor.element_size()]
    bits = tensor.contiguous().view(integers).clone()
    bits[tensor.isnan()] = -1
    return bits


@needs_cpu_kernels
@pytest.mark.parametrize("channels", FAMILY_HEAD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_cpu_forward_from_a_staged_head_gives_the_unstaged_bits(channels, dtype, fused):
    # Where a (batch, head)'s rows are read 2.5 times each or more (csrc/cpu: StagedHead::pays), the CPU forward
    # samples a copy of them with a border of zeros. The test levels have 63 rows and a query reads 44 (11 points,
    # 4 corners): six queries (4.2 reads a row) stage, one (0.7) does not. A query's output depends on that query
    # alone, so the six-query call must give, query by query, the bits of one-query calls: the same weights and
    # the same order of the sum, outside corners reading zeros, with locations that are NaN, infinite, huge or
    # outside the levels, a NaN in value and one in the attention weights or logits (fp64 stages up to 16
    # channels; 14 channels, whose last two are single ones past the vectors in fp32, do not stage).
    batch, queries, heads = 2, 6, 3
    if fused:
        value, reference, offsets, logits = make_fused_inputs(batch=batch, queries=queries, heads=heads,
                                                              channels=channels, dtype=dtype)
        offsets.view(-1)[::7] = 40.0  # far outside
        offsets.view(-1)[3::29] = float("inf")
        logits.view(-1)[5] = float("nan")
        per_query = (reference, offsets, logits)
        call = lambda r, o, a: ms_deform_attn_fused(value, SHAPES, r, o, a, POINTS, 0.5, backend="cpu")
    else:
        value, locations, weights = make_inputs(batch=batch, queries=queries, heads=heads, channels=channels,
                                                dtype=dtype)
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -3e9, 2.0, -1.0], dtype=dtype)
        locations.view(-1)[: 13 * specials.numel() : 13] = specials
        weights.view(-1)[5] = float("nan")
        per_query = (locations, weights)
        call = lambda l, w: ms_deform_attn(value, SHAPES, l, w, POINTS, backend="cpu")
    value[1, 7, 2, 0] = float("nan")
    with torch.no_grad():
        staged = call(*per_query)
        for q in range(queries):
            unstaged = call(*(t[:, q : q + 1] for t in per_query))
            assert torch.equal(bits_with_nan_positions(staged[:, q : q + 1]), bits_with_nan_positions(unstaged)), q
    assert staged.isnan().any() and not staged.isnan().all()


def test_gather_form_of_the_reference_equals_grid_sample():
    inputs = tuple(t.requires_grad_() for t in make_inputs())  # with pixel centres and level edges
    for method in METHODS:
        results = [run_with_grads(lambda v, l, w: ms_deform_attn_reference(v, SHAPES, l, w, POINTS, method,
                                                                           bilinear=form), *inputs)
                   for form in ("grid_sample", "gather")]
        for name, a, e in zip(NAMES, *results):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=f"{method} {name}")
    with pytest.raises(ValueError, match="bilinear must be"):
        ms_deform_attn_reference(*inputs[:1], SHAPES, *inputs[1:], POINTS, bilinear="nearest")


@pytest.mark.parametrize("backend", [b for b in backends_for("cpu") if b != "torch"])
def test_first_derivatives_come_from_the_kernels(monkeypatch, backend):
    # The reference serves second derivatives only: a backward pass runs the backward kernel, also one that
    # builds a graph (create_graph=True), and only differentiating its gradients again reaches the reference.
    from rtdetrv2_kernels import _op_formulas

    calls = []
    original = _op_formulas.ms_deform_attn_reference
    monkeypatch.setattr(_op_formulas, "ms_deform_attn_reference",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    inputs = tuple(t.requires_grad_() for t in make_inputs())

    def output():
        return ms_deform_attn(inputs[0], SHAPES, *inputs[1:], POINTS, backend=backend)

    expected = torch.autograd.grad(output().sum(), inputs)
    gradients = torch.autograd.grad(output().sum(), inputs, create_graph=True)
    assert calls == []
    for name, gradient, first in zip(NAMES[1:], gradients, expected):
        assert gradient.requires_grad, name
        torch.testing.assert_close(gradient, first, rtol=0, atol=0, msg=name)
    torch.autograd.grad(sum((g * g).sum() for g in gradients), inputs)
    assert calls


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_discrete_location_gradient_is_zero(backend, device):
    value, locations, weights = make_inputs(device=device)
    _, _, grad_locations, _ = run_with_grads(
        lambda v, l, w: ms_deform_attn(v, SHAPES, l, w, POINTS, "discrete", backend=backend), value, locations, weights
    )
    assert torch.equal(grad_locations, torch.zeros_like(grad_locations))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_nonfinite_and_huge_locations_read_nothing_outside(backend, device, method, dtype):
    value, locations, weights = make_inputs(batch=1, queries=4, heads=2, channels=5, dtype=dtype, borders=False)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e9, -3e9, 2.0**31],
                            dtype=dtype)
    locations[0, :, :, :, 0].view(-1)[: specials.numel()] = specials
    locations[0, :, :, :, 1].view(-1)[-specials.numel():] = specials.flip(0)
    inputs = [t.to(device) for t in (value, locations, weights)]
    expected = run_with_grads(lambda v, l, w: ms_deform_attn_reference(v, SHAPES, l, w, POINTS, method),
                              *(t.double().cpu() for t in inputs))
    actual = run_with_grads(lambda v, l, w: ms_deform_attn(v, SHAPES, l, w, POINTS, method, backend=backend), *inputs)
    for name, a, e in zip(NAMES, actual, expected):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_non_contiguous_and_expanded_inputs(backend, device, method):
    value, locations, weights = make_inputs(batch=1, device=device)
    # value expanded over the batch (stride 0) and with its heads sliced; locations and weights transposed.
    value_big = torch.cat([value, value], dim=2)[:, :, ::2].expand(3, -1, -1, -1)
    locations_t = locations.expand(3, -1, -1, -1, -1).transpose(1, 2).contiguous().transpose(1, 2)
    weights_t = weights.expand(3, -1, -1, -1)
    assert not value_big.is_contiguous() and not locations_t.is_contiguous() and not weights_t.is_contiguous()
    expected = ms_deform_attn_reference(value_big.contiguous(), SHAPES, locations_t.contiguous(),
                                        weights_t.contiguous(), POINTS, method)
    actual = ms_deform_attn(value_big, SHAPES, locations_t, weights_t, POINTS, method, backend=backend)
    assert_close(actual, expected, torch.float64, "output")
    # Channels strided: the kernel must copy rather than misread.
    value_strided = torch.stack([value, value], dim=-1)[..., 0]
    assert value_strided.stride(-1) == 2
    actual = ms_deform_attn(value_strided, SHAPES, locations, weights, POINTS, method, backend=backend)
    assert_close(actual, ms_deform_attn_reference(value, SHAPES, locations, weights, POINTS, method),
                 torch.float64, "output")
    # Contiguous, C a multiple of the 16-byte vector, but the data 8 bytes past a 16-byte boundary: a kernel
    # must not use vector loads (a GPU faults on a misaligned one; UBSan flags it in the emulation).
    value, locations, weights = make_inputs(batch=1, channels=8, device=device)
    storage = torch.zeros(value.numel() + 1, dtype=value.dtype, device=device)
    value_offset = storage[1:].view(value.shape).copy_(value)
    assert value_offset.data_ptr() % 16 == 8
    actual = run_with_grads(lambda v, l, w: ms_deform_attn(v, SHAPES, l, w, POINTS, method, backend=backend),
                            value_offset, locations, weights)
    expected = run_with_grads(lambda v, l, w: ms_deform_attn_reference(v, SHAPES, l, w, POINTS, method),
                              value, locations, weights)
    for name, a, e in zip(NAMES, actual, expected):
        assert_close(a, e, torch.float64, f"misaligned value: {name}")


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_cpu_backward_of_a_value_broadcast_over_the_batch_writes_each_images_gradient(dtype, method):
    # value expanded over the batch (stride 0): every image reads the same rows, but its grad_value rows are its
    # own. The CPU kernels keep a task's row addresses while its (batch, head) stays the same; keyed on value's
    # rows alone, they would add every image's gradient into the first image's rows (with one head, the tasks
    # of consecutive images follow each other). The raw op is called: through autograd, the expand's backward
    # sums the images, which would hide it.
    images = [make_inputs(batch=1, heads=1, dtype=dtype, seed=seed) for seed in range(3)]  # own samples each
    value_expanded = images[0][0].expand(len(images), -1, -1, -1)
    locations = torch.cat([locations for _, locations, _ in images])
    weights = torch.cat([weights for _, _, weights in images])
    grad_output = torch.randn(len(images), locations.size(1), value_expanded.size(2) * value_expanded.size(3),
                              generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    actual = torch.ops.rtdetrv2_kernels.ms_deform_attn_backward(
        grad_output, value_expanded, FLAT_SHAPES, locations, weights, POINTS, method)
    expected = run_with_grads(lambda v, l, w: ms_deform_attn_reference(v, SHAPES, l, w, POINTS, method),
                              *(t.double() for t in (value_expanded.contiguous(), locations, weights)),
                              grad_output=grad_output.double())
    for name, a, e in zip(NAMES[1:], actual, expected[1:]):
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_samples_outside_a_value_broadcast_over_its_rows_read_nothing(backend, device, dtype):
    # value expanded over its rows (row stride 0, so every row's byte offset is 0) and infinite: a sample
    # outside every level must read nothing, not some row times a zero weight (inf * 0 is NaN).
    value, locations, weights = make_inputs(batch=2, dtype=dtype, device=device)
    row = torch.full_like(value[:, :1], float("inf")).requires_grad_()
    locations = (2 + locations.abs()).requires_grad_()  # beyond the far edge of every level
    weights.requires_grad_()
    output = ms_deform_attn(row.expand_as(value), SHAPES, locations, weights, POINTS, backend=backend)
    gradients = torch.autograd.grad(output, (row, locations, weights), torch.ones_like(output))
    for name, a in zip(NAMES, (output, *gradients)):
        assert torch.equal(a, torch.zeros_like(a)), name


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("batch,queries", [(0, 4), (2, 0)])
def test_empty_batch_or_queries(backend, device, batch, queries):
    value, locations, weights = make_inputs(batch=batch, queries=queries, device=device)
    value.requires_grad_()
    output = ms_deform_attn(value, SHAPES, locations, weights, POINTS, backend=backend)
    assert output.shape == (batch, queries, value.shape[2] * value.shape[3])
    output.sum().backward()
    assert value.grad.shape == value.shape and not value.grad.any()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_every_output_element_is_written(backend, device):
    # All samples inside their level with nonzero weights: an unwritten row shows up as a mismatch.
    value, locations, weights = make_inputs(batch=2, queries=9, heads=4, channels=32, device=device, borders=False)
    locations = locations.clamp(0.05, 0.95)
    weights = weights + 0.5
    for _ in range(3):  # fresh allocations each time, possibly reusing freed memory
        output = ms_deform_attn(value, SHAPES, locations, weights, POINTS, backend=backend)
        expected = ms_deform_attn_reference(value, SHAPES, locations, weights, POINTS)
        assert (expected.abs() > 0).all()
        assert_close(output, expected, torch.float64, "output")


@needs_cpu_kernels
def test_cpu_backward_is_bitwise_reproducible_across_thread_counts():
    inputs = make_inputs(batch=2, queries=16, heads=4, channels=32, dtype=torch.float32)
    results = []
    for count in (1, 2, 1):
        with torch_threads(count):
            results.append(run_with_grads(
                lambda v, l, w: ms_deform_attn(v, SHAPES, l, w, POINTS, backend="cpu"), *inputs))
    for other in results[1:]:
        for name, a, b in zip(NAMES, results[0], other):
            assert torch.equal(a, b), name


@pytest.mark.skipif("triton" not in GPU_KERNELS, reason="needs a GPU and the triton backend")
def test_triton_level_shapes_first_seen_inside_a_cuda_graph_capture():
    # The level table of shapes never seen before is made inside the capture (by fills, not a host copy);
    # the kernel itself compiles before it, for other shapes with the same point counts.
    points = [2, 3]
    warm = make_inputs(channels=32, shapes=[(6, 9), (2, 4)], points=points, dtype=torch.float32, device="cuda")
    ms_deform_attn(warm[0], [(6, 9), (2, 4)], *warm[1:], points, backend="triton")
    shapes = [(7, 11), (3, 2)]
    value, locations, weights = make_inputs(channels=32, shapes=shapes, points=points, dtype=torch.float32,
                                            device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ms_deform_attn(value, shapes, locations, weights, points, backend="triton")
    graph.replay()
    expected = ms_deform_attn_reference(value.double(), shapes, locations.double(), weights.double(), points)
    assert_close(captured, expected, torch.float32, "output replayed")


@needs_gpu_kernels
@pytest.mark.parametrize("backend", GPU_KERNELS or ["none"])
def test_inference_forward_is_one_kernel_launch(backend):
    value, locations, weights = make_inputs(batch=1, channels=32, dtype=torch.float16, device="cuda")
    ms_deform_attn(value, SHAPES, locations, weights, POINTS, backend=backend)  # Triton compiles and tunes here
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        with torch.no_grad():
            ms_deform_attn(value, SHAPES, locations, weights, POINTS, backend=backend)
        torch.cuda.synchronize()
    kernels = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, kernels


# One level whose fp32 grad_value is 34.6 MiB (> 32 MiB): the backward takes it from the reuse pool.
POOLED_SHAPES, POOLED_POINTS = [(150, 236)], [4]
POOLED_VALUE = dict(batch=1, queries=40, heads=8, channels=32, shapes=POOLED_SHAPES, points=POOLED_POINTS,
                    borders=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", METHODS)
@needs_cpu_kernels
def test_cpu_backward_reuses_large_gradient_buffers_zeroed(dtype, method):
    rtdetrv2_kernels.empty_cache()
    for seed in range(3):
        inputs = make_inputs(dtype=dtype, seed=seed, **POOLED_VALUE)
        actual = run_with_grads(
            lambda v, l, w: ms_deform_attn(v, POOLED_SHAPES, l, w, POOLED_POINTS, method, backend="cpu"), *inputs)
        expected = run_with_grads(
            lambda v, l, w: ms_deform_attn_reference(v, POOLED_SHAPES, l, w, POOLED_POINTS, method),
            *(t.double() for t in inputs))
        for name, a, e in zip(NAMES, actual, expected):
            assert_close(a, e, dtype, f"call {seed} {name}")
        # Poison the gradient before it returns to the pool: the next call must not see any of it.
        actual[1].fill_(float("nan"))
        del actual
    rtdetrv2_kernels.empty_cache()


@needs_cpu_kernels
def test_pooled_gradient_is_an_ordinary_tensor():
    value, locations, weights = make_inputs(dtype=torch.float32, **POOLED_VALUE)
    value.requires_grad_()
    for _ in range(2):  # autograd keeps the first gradient as value.grad and adds the second into it
        ms_deform_attn(value, POOLED_SHAPES, locations, weights, POOLED_POINTS, backend="cpu").sum().backward()
    expected = value.detach().clone().requires_grad_()
    ms_deform_attn_reference(expected, POOLED_SHAPES, locations, weights, POOLED_POINTS).sum().backward()
    assert_close(value.grad, 2 * expected.grad, torch.float32, "accumulated grad_value")
    grad = value.grad
    grad.resize_(grad.numel() * 2)  # storage from the pool is resizable like any other
    assert grad.numel() == value.numel() * 2
    rtdetrv2_kernels.empty_cache()
    rtdetrv2_kernels.empty_cache()  # idempotent


@needs_cpu_kernels
def test_pooled_gradient_shows_in_memory_profiles():
    from torch.profiler import ProfilerActivity, profile

    value, locations, weights = make_inputs(dtype=torch.float32, **POOLED_VALUE)
    value.requires_grad_()
    for _ in range(2):  # the second call reuses the first one's buffer
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            ms_deform_attn(value, POOLED_SHAPES, locations, weights, POOLED_POINTS, backend="cpu").sum().backward()
            value.grad = None
        sizes = [e.nbytes() for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        assert value.numel() * 4 in sizes, "the pooled grad_value's allocation is not reported"
        assert -value.numel() * 4 in sizes, "the pooled grad_value's release is not reported"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_weights_as_documented(backend, device, method):
    """docs/semantics.md, "Non-finite and huge locations": a weight's own row for NaN and infinite weights."""
    value, locations, _ = make_inputs(batch=1, queries=4, heads=1, channels=3, shapes=[(4, 4)], points=[1],
                                      device=device)
    # On a pixel centre (corner weights 1 and 0), between pixels, and outside the level (a zero sample).
    locations[0, :3, 0, 0] = torch.tensor([[1.5 / 4, 2.5 / 4], [0.33, 0.55], [5.0, 5.0]], dtype=value.dtype)
    for weight in (float("nan"), float("inf"), -float("inf")):
        weights = torch.full((1, 4, 1, 1), weight, dtype=value.dtype, device=device)
        weights[0, 3] = 1.0  # a finite row beside them stays finite
        output = ms_deform_attn(value, [(4, 4)], locations, weights, [1], method, backend=backend)[0, :, :]
        sample = ms_deform_attn_reference(value, [(4, 4)], locations, torch.ones_like(weights), [1], method)[0]
        assert torch.isfinite(output[3]).all()
        if weight != weight:
            assert output[:3].isnan().all()
        elif method == "discrete" or backend != "cpu":
            torch.testing.assert_close(output[:3], weight * sample[:3], equal_nan=True, rtol=0, atol=0)
        else:  # the weight folded into the corner weights: NaN from a corner of weight 0, else non-finite
            assert output[[0, 2]].isnan().all() and not torch.isfinite(output[1]).any()
