"""What the detector tests share: tiny random-weight models (python_model's RTDETRv2 and transformers'), a test
image batch, and a loss that reaches every prediction."""

from __future__ import annotations

import torch

# A python_model test batch: strides 8/16/32 give non-square levels 8x12, 4x6, 2x3 (and 1x2 as a fourth level).
IMAGE = (2, 3, 64, 96)


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
