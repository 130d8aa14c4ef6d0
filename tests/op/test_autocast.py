"""The autocast policy (docs/integrations.md, "Autocast"): under torch.autocast, inputs of mixed float dtypes are
cast to the widest of them, which is the output's dtype; inputs of one dtype, and everything outside
autocast, behave as without autocast. CPU bf16 here; the same code path serves CUDA fp16/bf16."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_params, make_inputs

import rtdetrv2_kernels

SHAPES = [(4, 8), (8, 2), (3, 5)]
POINTS = [3, 6, 3]
HEADS, CHANNELS = 2, 4


def project_value(linear, memory):
    """value as a model makes it: a linear layer's output (bf16 under CPU autocast), split into heads."""
    value = linear(memory)
    return value.view(*value.shape[:2], HEADS, CHANNELS)


def fp32_inputs(seed=0):
    _, locations, weights = make_inputs(batch=2, queries=5, heads=HEADS, channels=CHANNELS, shapes=SHAPES,
                                        points=POINTS, dtype=torch.float32, seed=seed, borders=False)
    generator = torch.Generator().manual_seed(seed + 10)
    memory = torch.randn(2, sum(h * w for h, w in SHAPES), HEADS * CHANNELS, generator=generator)
    linear = torch.nn.Linear(HEADS * CHANNELS, HEADS * CHANNELS)
    return linear, memory, locations, weights


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[1] == "cpu"])
def test_bf16_value_with_fp32_locations_runs_in_fp32(backend, device):
    linear, memory, locations, weights = fp32_inputs()
    locations.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = project_value(linear, memory)
        assert value.dtype == torch.bfloat16 and locations.dtype == torch.float32
        output = rtdetrv2_kernels.ms_deform_attn(value, SHAPES, locations, weights, POINTS, backend=backend)
    assert output.dtype == torch.float32
    # Exactly the op on the same bf16 value widened to fp32, outside autocast.
    expected = rtdetrv2_kernels.ms_deform_attn(value.float(), SHAPES, locations, weights, POINTS, backend=backend)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    # Gradients reach the layer that made the value (through the cast) and the fp32 locations.
    output.square().sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    assert locations.grad is not None and locations.grad.dtype == torch.float32 and locations.grad.abs().sum() > 0


def test_promotion_is_to_the_widest_dtype():
    value, locations, weights = make_inputs(batch=1, queries=3, heads=2, channels=3, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = rtdetrv2_kernels.ms_deform_attn(value.bfloat16(), [(4, 8), (8, 2), (3, 5)], locations.double(),
                                                weights.bfloat16(), [3, 6, 2])
    assert mixed.dtype == torch.float64


def test_one_dtype_under_autocast_is_left_alone():
    value, locations, weights = make_inputs(batch=1, queries=3, heads=2, channels=3, dtype=torch.bfloat16)
    outside = rtdetrv2_kernels.ms_deform_attn(value, [(4, 8), (8, 2), (3, 5)], locations, weights, [3, 6, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = rtdetrv2_kernels.ms_deform_attn(value, [(4, 8), (8, 2), (3, 5)], locations, weights, [3, 6, 2])
    assert inside.dtype == torch.bfloat16
    assert torch.equal(inside, outside)


def test_mixed_dtypes_outside_autocast_still_raise():
    value, locations, weights = make_inputs(batch=1, queries=3, heads=2, channels=3, dtype=torch.float32)
    with pytest.raises(TypeError, match="sampling_locations has dtype"):
        rtdetrv2_kernels.ms_deform_attn(value.bfloat16(), [(4, 8), (8, 2), (3, 5)], locations, weights, [3, 6, 2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_autocast_does_not_apply_to_cpu_tensors():
    value, locations, weights = make_inputs(batch=1, queries=3, heads=2, channels=3, dtype=torch.float32)
    with torch.autocast("cuda", dtype=torch.float16), pytest.raises(TypeError):
        rtdetrv2_kernels.ms_deform_attn(value.bfloat16(), [(4, 8), (8, 2), (3, 5)], locations, weights, [3, 6, 2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_half_value_with_fp32_locations(dtype):
    linear, memory, locations, weights = fp32_inputs()
    linear, memory, locations, weights = linear.cuda(), memory.cuda(), locations.cuda(), weights.cuda()
    with torch.autocast("cuda", dtype=dtype):
        value = project_value(linear, memory)
        assert value.dtype == dtype
        output = rtdetrv2_kernels.ms_deform_attn(value, SHAPES, locations, weights, POINTS)
    assert output.dtype == torch.float32
    expected = rtdetrv2_kernels.ms_deform_attn(value.float(), SHAPES, locations, weights, POINTS)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


def test_fused_op_under_autocast():
    linear, memory, offsets, logits = fp32_inputs(seed=1)
    reference = torch.rand(2, 5, 1, 4) * 0.5 + 0.25
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = project_value(linear, memory)
        output = rtdetrv2_kernels.ms_deform_attn_fused(value, SHAPES, reference, offsets, logits, POINTS)
    assert output.dtype == torch.float32
    expected = rtdetrv2_kernels.ms_deform_attn_fused(value.float(), SHAPES, reference, offsets, logits, POINTS)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


def test_compiled_under_autocast_without_graph_breaks():
    """The policy reads the autocast state and the dtypes only, which torch.compile folds into constants."""
    linear, memory, locations, weights = fp32_inputs(seed=2)

    def layer(memory, locations, weights):
        value = project_value(linear, memory)
        return rtdetrv2_kernels.ms_deform_attn(value, SHAPES, locations, weights, POINTS)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(memory, locations, weights)
        actual = compiled(memory, locations, weights)
    assert actual.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_patched_transformers_model_under_autocast():
    """A patched transformers model under bf16 autocast gives the unpatched detections. (transformers 5.x
    hands the core value, locations and weights in one dtype, so this runs the op in bf16.)"""
    transformers = pytest.importorskip("transformers")
    from rtdetrv2_kernels.integrations import transformers as integration

    backbone = transformers.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                               layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    config = transformers.RTDetrV2Config(
        backbone_config=backbone, d_model=16, encoder_hidden_dim=16, encoder_in_channels=[16, 16, 16],
        decoder_in_channels=[16, 16, 16], encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
        decoder_attention_heads=2, decoder_layers=2, num_queries=10, num_denoising=0, num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.RTDetrV2ForObjectDetection(config).eval()
    pixel_values = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(pixel_values=pixel_values)
        with integration.patched():
            actual = model(pixel_values=pixel_values)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes, rtol=2e-2, atol=2e-2)
