"""What the op tests share: random inputs of the ops, the comparison against fp64 expectations, the gradient
helper, and the backends (with their pytest parameters and skip markers) that tests run on."""

from __future__ import annotations

import contextlib
import os

import emulated_cuda
import pytest
import torch

import rtdetrv2_kernels
from rtdetrv2_kernels import backends

# Non-square levels (W > H and H > W); power-of-two sides where border locations are placed exactly.
SHAPES = [(4, 8), (8, 2), (3, 5)]
POINTS = [3, 6, 2]
FLAT_SHAPES = [size for shape in SHAPES for size in shape]  # the schema's int[] spatial_shapes
# The family's head sizes: DEIMv2's 8 to 32 channels per head (RF-DETR and LW-DETR: 16; RT-DETRv2: 32).
FAMILY_HEAD_SIZES = [8, 12, 14, 16, 24, 28, 32]
FUSED_POINTS = [3, 6, 2]
FLAT_SHAPES = [size for shape in SHAPES for size in shape]  # the schema's int[] spatial_shapes


def backends_for(device_type: str) -> list[str]:
    """The public backends that run on tensors of `device_type` here."""
    return [b for b in rtdetrv2_kernels.BACKENDS if backends.unavailable_reason(b, device_type) is None]


# The CUDA kernels built for the CPU against an emulation of CUDA (tests/emulated_cuda/): more backends on CPU
# tensors, "cuda-emulated-sm80" and "cuda-emulated-sm90" (RTDETRV2_EMULATION_ARCHS selects), in every test that
# runs the kernel backends. Their names are known here without building them: conftest.py builds one (about a
# minute, the first time) when a test that runs it starts, and a failed build makes those tests error.
# RTDETRV2_SKIP_EMULATION=1 leaves them out (the GPU check, which has real CUDA and little time).
SKIP_EMULATION = os.environ.get("RTDETRV2_SKIP_EMULATION") == "1"
EMULATED_ARCHS = emulated_cuda.selected_archs()
EMULATED_ARCH_OF = {} if SKIP_EMULATION else {emulated_cuda.backend_name(arch): arch for arch in EMULATED_ARCHS}
EMULATED_BACKENDS = list(EMULATED_ARCH_OF)
needs_emulation = pytest.mark.skipif(SKIP_EMULATION, reason="RTDETRV2_SKIP_EMULATION=1")


def has_tensor_levels(backend: str) -> bool:
    """Whether `backend`'s kernels take the level table as tensors. The emulated builds are the CUDA kernels'
    (registered only once built), which do."""
    return backend in EMULATED_BACKENDS or backends.get(backend).tensor_levels is not None


def _param(backend, device):
    return pytest.param(backend, device, id=f"{backend}-{device}")


def backend_params():
    """(backend, device type) for every backend available here, on CPU and (when present) on CUDA, and the
    emulated CUDA kernels on CPU tensors."""
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    return [_param(b, d) for d in devices for b in backends_for(d)] + [_param(b, "cpu") for b in EMULATED_BACKENDS]


def cuda_kernel_params():
    """(backend, device type) for the CUDA kernels: on a GPU, and emulated on CPU tensors."""
    real = [_param("cuda", "cuda")] if torch.cuda.is_available() and "cuda" in backends_for("cuda") else []
    return real + [_param(b, "cpu") for b in EMULATED_BACKENDS]


def tensor_level_params():
    """(backend, device type) for the backends whose kernels take the level table as tensors: the CPU kernels,
    the CUDA kernels on a GPU and emulated."""
    return [p for p in backend_params() if has_tensor_levels(p.values[0])]


GPU_KERNELS = [b for b in backends_for("cuda") if b != "torch"] if torch.cuda.is_available() else []
needs_gpu_kernels = pytest.mark.skipif(not GPU_KERNELS, reason="needs a GPU and a GPU kernel backend")
needs_cpu_kernels = pytest.mark.skipif("cpu" not in backends_for("cpu"), reason="the C++ CPU kernels are not available")


def make_inputs(
    batch=2,
    queries=5,
    heads=3,
    channels=7,
    shapes=SHAPES,
    points=POINTS,
    dtype=torch.float64,
    device="cpu",
    borders=True,
    seed=0,
):
    """Fresh random inputs: locations spread over [-0.3, 1.3], plus exact pixel centers and level edges on
    the power-of-two levels (where they are exact in binary), so kernels and reference agree on the floor."""
    generator = torch.Generator().manual_seed(seed)
    total_rows = sum(h * w for h, w in shapes)
    total_points = sum(points)
    value = torch.randn(batch, total_rows, heads, channels, generator=generator, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, total_points, 2, generator=generator, dtype=torch.float64)
    locations = locations * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, total_points, generator=generator, dtype=torch.float64)
    if borders:
        first = 0
        for (height, width), count in zip(shapes, points):
            for axis, size in ((0, width), (1, height)):
                if size & (size - 1) == 0:  # power of two: k / (2 size) is exact
                    grid = torch.randint(-2, 2 * size + 3, locations[..., first : first + count, axis].shape,
                                         generator=generator)
                    exact = grid.double() / (2 * size)
                    keep = torch.rand(exact.shape, generator=generator) < 0.5
                    locations[..., first : first + count, axis] = torch.where(
                        keep, exact, locations[..., first : first + count, axis]
                    )
            first += count
    return (
        value.to(dtype=dtype, device=device),
        locations.to(dtype=dtype, device=device),
        weights.to(dtype=dtype, device=device),
    )


# Where the tensor-levels op finds SHAPES' levels in a value of PLACED_ROWS rows: level 2 first, then level 0
# after 3 unused rows, then level 1 after 1, and 3 unused rows at the end.
PLACED_STARTS = [18, 51, 0]
PLACED_ROWS = 70


def place_levels(value, shapes=SHAPES, starts=PLACED_STARTS, rows=PLACED_ROWS):
    """value (B, sum of H_l*W_l, H, C), levels in order, with level l moved to rows starts[l] onwards of a
    zero (B, rows, H, C) tensor: Deformable DETR's level_start_index layout. Differentiable in value."""
    sizes = [h * w for h, w in shapes]
    targets = torch.cat([torch.arange(start, start + size) for start, size in zip(starts, sizes)])
    return value.new_zeros(value.shape[0], rows, *value.shape[2:]).index_copy(1, targets.to(value.device), value)


def make_fused_inputs(batch=2, queries=5, heads=3, channels=7, shapes=SHAPES, points=FUSED_POINTS,
                      reference="boxes", per_level=False, dtype=torch.float64, device="cpu", seed=0):
    """Fresh random inputs of ms_deform_attn_fused: value, reference boxes (cx, cy, w, h) or points (one row, or
    one per level), raw offsets and logits."""
    generator = torch.Generator().manual_seed(seed)
    rows, total = sum(h * w for h, w in shapes), sum(points)
    value = torch.randn(batch, rows, heads, channels, generator=generator, dtype=torch.float64)
    offsets = torch.randn(batch, queries, heads, total, 2, generator=generator, dtype=torch.float64) * 2
    logits = torch.randn(batch, queries, heads, total, generator=generator, dtype=torch.float64) * 2
    levels = len(shapes) if per_level else 1
    centers = torch.rand(batch, queries, levels, 2, generator=generator, dtype=torch.float64) * 1.2 - 0.1
    if reference == "boxes":
        sizes = torch.rand(batch, queries, levels, 2, generator=generator, dtype=torch.float64) * 0.8 + 0.05
        ref = torch.cat([centers, sizes], -1)
    else:
        ref = centers
    return [t.to(dtype=dtype, device=device) for t in (value, ref, offsets, logits)]


def assert_close(actual, expected, dtype, what=""):
    """Compares against an fp64 expectation with a tolerance set by the dtype the kernel ran in, scaled by
    the magnitude of the expectation."""
    tolerance = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} > {tolerance * scale:.3g} ({dtype})"


def run_with_grads(fn, *inputs, grad_output=None):
    """[fn's output, the gradient of each input (None where fn does not use it)] for fresh leaf copies of
    `inputs`, backpropagating grad_output (by default a fixed random one)."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    output = fn(*inputs)
    if grad_output is None:
        grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return [output, *torch.autograd.grad(output, inputs, grad_output.to(output), allow_unused=True)]


def capture_cuda_graph(fn):
    """(graph, fn's outputs as captured): fn runs once on a side stream first, so that lazy initialization
    (and Triton's autotuning) happens outside the capture; graph.replay() then reruns it on the same buffers."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    return graph, captured


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to `count` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
