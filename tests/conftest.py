from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Set before the package
# imports Triton, since @triton.jit reads it when the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import rtdetrv2_kernels  # noqa: E402

# Non-square levels (W > H and H > W); power-of-two sides where border locations are placed exactly.
SHAPES = [(4, 8), (8, 2), (3, 5)]
POINTS = [3, 6, 2]


def backends_for(device_type: str) -> list[str]:
    from rtdetrv2_kernels.backends import unavailable_reason

    return [b for b in rtdetrv2_kernels.BACKENDS if unavailable_reason(b, device_type) is None]


# The CUDA kernels built for the CPU against an emulation of CUDA (tests/emulated_cuda/): two more backends
# on CPU tensors, "cuda-emulated-sm80" and "cuda-emulated-sm90", in every test that runs the kernel
# backends. Built at collection (about a minute each, the first time); a failed build fails the run.
# RTDETRV2_SKIP_EMULATION=1 leaves them out (the GPU check, which has real CUDA and little time).
SKIP_EMULATION = os.environ.get("RTDETRV2_SKIP_EMULATION") == "1"
if not SKIP_EMULATION:
    import emulated_cuda

    for _arch in emulated_cuda.ARCHS:
        emulated_cuda.load(_arch)
EMULATED_BACKENDS = [] if SKIP_EMULATION else [emulated_cuda.backend_name(arch) for arch in emulated_cuda.ARCHS]
needs_emulation = pytest.mark.skipif(SKIP_EMULATION, reason="RTDETRV2_SKIP_EMULATION=1")


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


def pytest_terminal_summary(terminalreporter):
    """Lists the CUDA kernel instantiations the emulated backends launched in this run, and those never
    launched."""
    if SKIP_EMULATION:
        return
    for arch in emulated_cuda.ARCHS:
        counts = emulated_cuda.launch_counts(arch)
        launched = sorted(name for name, count in counts.items() if count)
        if not launched:
            continue
        missed = sorted(name for name, count in counts.items() if not count)
        terminalreporter.write_sep("-", f"emulated sm_{arch}: {len(launched)} of {len(counts)} CUDA kernel "
                                        "instantiations launched")
        for name in launched:
            terminalreporter.write_line(f"  {counts[name]:6d}  {name}")
        for name in missed:
            terminalreporter.write_line(f"  never   {name}")


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


FUSED_POINTS = [3, 6, 2]


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


def run_with_grads(fn, value, locations, weights, grad_output=None):
    """Output and the gradients of value, locations and weights for a fixed random output gradient."""
    value, locations, weights = (t.detach().clone().requires_grad_() for t in (value, locations, weights))
    output = fn(value, locations, weights)
    if grad_output is None:
        generator = torch.Generator().manual_seed(1)
        grad_output = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad(output, (value, locations, weights), grad_output.to(output), allow_unused=True)
    return (output, *grads)


def tiny_model(method="default", num_points=(3, 6, 3), **overrides):
    """A python_model RTDETRv2 small enough for tests: 16 channels, 2 decoder layers, 12 queries, 3 classes."""
    from python_model import RTDETRv2, preset

    settings = dict(
        backbone_depths=[1, 1, 1, 1], backbone_stem_channels=8, backbone_channels=[8, 16, 24, 32],
        encoder_hidden_dim=16, encoder_heads=2, encoder_ffn_dim=32, hidden_dim=16, decoder_in_channels=[16] * 3,
        decoder_heads=2, num_decoder_layers=2, decoder_ffn_dim=32, num_queries=12, num_classes=3,
        labels=["a", "b", "c"], num_points=list(num_points), cross_attn_method=method, num_denoising=8,
    )
    torch.manual_seed(0)
    return RTDETRv2(preset("r18vd", **{**settings, **overrides}))


# A python_model test batch: strides 8/16/32 give non-square levels 8x12, 4x6, 2x3 (and 1x2 as a fourth level).
IMAGE = (2, 3, 64, 96)


def tiny_transformers_model(block="basic", levels=3, layers=2, method="default", points=4, backbone=None,
                            **config):
    """transformers' RTDetrV2ForObjectDetection, small and with random weights (eval mode); `backbone` and
    `config` override RTDetrResNetConfig and RTDetrV2Config fields."""
    import transformers

    widths = [8, 16, 24, 32] if block == "basic" else [16, 24, 32, 48]
    backbone_config = transformers.RTDetrResNetConfig(**{
        **dict(embedding_size=8, hidden_sizes=widths, depths=[1, 2, 1, 1], layer_type=block,
               out_features=["stage2", "stage3", "stage4"]), **(backbone or {})})
    model_config = transformers.RTDetrV2Config(**{**dict(
        backbone_config=backbone_config, d_model=16, encoder_hidden_dim=16, encoder_in_channels=widths[1:],
        decoder_in_channels=[16, 16, 16], encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
        decoder_attention_heads=2, decoder_layers=layers, num_queries=12, num_labels=3, num_feature_levels=levels,
        decoder_n_levels=levels, decoder_n_points=points, decoder_method=method), **config})
    torch.manual_seed(0)
    return randomize_(transformers.RTDetrV2ForObjectDetection(model_config).eval())


def randomize_(model):
    """Random parameters and BatchNorm statistics, drawn from the global RNG. Models initialize many weights
    to constants (zero offsets, logits and box deltas, unit norms); random values everywhere make every term
    of the computation matter (and spread the query scores, so the top-k selection has no near-ties)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
            elif name.endswith("running_mean"):
                buffer.copy_(torch.randn_like(buffer) * 0.1)
    return model


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


def training_loss(outputs):
    """A stand-in for a detection criterion over every prediction of a training forward with targets (final,
    auxiliary, encoder and denoising): it pushes every box towards the image center and every logit down.
    Simple, and it reaches every trainable parameter of python_model."""
    terms = [outputs, *outputs["aux_outputs"], *outputs["enc_aux_outputs"], *outputs["dn_aux_outputs"]]
    return sum((o["pred_boxes"] - 0.5).abs().mean() + o["pred_logits"].sigmoid().mean() for o in terms)


GPU_KERNELS = [b for b in backends_for("cuda") if b != "torch"] if torch.cuda.is_available() else []
needs_gpu_kernels = pytest.mark.skipif(not GPU_KERNELS, reason="needs a GPU and a GPU kernel backend")
needs_cpu_kernels = pytest.mark.skipif("cpu" not in backends_for("cpu"), reason="the C++ CPU kernels are not available")


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
