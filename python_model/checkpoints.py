"""Reading weights: Hugging Face model directories (and Hub ids), and the original RT-DETRv2 training
checkpoints, each into a configuration and a state dict under this model's parameter names (an explicit key
mapping, tabulated in docs/python_model.md). model.py builds models from them (this module never imports
it); a load fails with the lists of missing, unexpected and mis-shaped keys rather than loading anything
silently wrong.

This model's names are the original code's (lyuwenyu/RT-DETR, rtdetrv2_pytorch), so the original mapping
only drops buffers that this model derives from its configuration.
"""

from __future__ import annotations

import json
import os
import re

import torch

from torch import nn

from .config import CRITERION_FIELDS, RTDETRv2Config, preset


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: the message lists every key that did not match."""


# --------------------------------------------------------------------------------------------------------
# Hugging Face transformers (RTDetrV2ForObjectDetection.save_pretrained): config.json + model.safetensors
# --------------------------------------------------------------------------------------------------------

_BACKBONE = r"model\.backbone\.model\."
_ENCODER_LAYER = r"model\.encoder\.(?:encoder|aifi)\.(\d+)\.layers\.(\d+)\."  # files | modules of 5.x
_DECODER_LAYER = r"model\.decoder\.layers\.(\d+)\."

# (transformers name pattern, this model's name), applied to each key in order; the first match wins.
TRANSFORMERS_KEY_MAP: list[tuple[str, str]] = [
    (_BACKBONE + r"embedder\.embedder\.0\.(convolution|normalization)\.", r"backbone.conv1.conv1_1.\1."),
    (_BACKBONE + r"embedder\.embedder\.1\.(convolution|normalization)\.", r"backbone.conv1.conv1_2.\1."),
    (_BACKBONE + r"embedder\.embedder\.2\.(convolution|normalization)\.", r"backbone.conv1.conv1_3.\1."),
    (_BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.0\.", r"backbone.res_layers.\1.blocks.\2.branch2a."),
    (_BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.1\.", r"backbone.res_layers.\1.blocks.\2.branch2b."),
    (_BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.2\.", r"backbone.res_layers.\1.blocks.\2.branch2c."),
    (_BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.1\.", r"backbone.res_layers.\1.blocks.\2.short.conv."),
    (_BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.", r"backbone.res_layers.\1.blocks.\2.short."),
    (r"model\.encoder_input_proj\.(\d+)\.0\.", r"encoder.input_proj.\1.conv."),
    (r"model\.encoder_input_proj\.(\d+)\.1\.", r"encoder.input_proj.\1.norm."),
    (_ENCODER_LAYER + r"self_attn_layer_norm\.", r"encoder.encoder.\1.layers.\2.norm1."),
    (_ENCODER_LAYER + r"final_layer_norm\.", r"encoder.encoder.\1.layers.\2.norm2."),
    (_ENCODER_LAYER + r"(?:mlp\.)?fc1\.", r"encoder.encoder.\1.layers.\2.linear1."),
    (_ENCODER_LAYER + r"(?:mlp\.)?fc2\.", r"encoder.encoder.\1.layers.\2.linear2."),
    (_ENCODER_LAYER, r"encoder.encoder.\1.layers.\2."),  # self_attn
    (r"model\.encoder\.", r"encoder."),  # lateral_convs, fpn_blocks, downsample_convs, pan_blocks
    (r"model\.decoder_input_proj\.(\d+)\.0\.", r"decoder.input_proj.\1.conv."),
    (r"model\.decoder_input_proj\.(\d+)\.1\.", r"decoder.input_proj.\1.norm."),
    (_DECODER_LAYER + r"self_attn_layer_norm\.", r"decoder.decoder.layers.\1.norm1."),
    (_DECODER_LAYER + r"encoder_attn_layer_norm\.", r"decoder.decoder.layers.\1.norm2."),
    (_DECODER_LAYER + r"encoder_attn\.", r"decoder.decoder.layers.\1.cross_attn."),
    (_DECODER_LAYER + r"(?:mlp\.)?fc1\.", r"decoder.decoder.layers.\1.linear1."),
    (_DECODER_LAYER + r"(?:mlp\.)?fc2\.", r"decoder.decoder.layers.\1.linear2."),
    (_DECODER_LAYER + r"final_layer_norm\.", r"decoder.decoder.layers.\1.norm3."),
    (_DECODER_LAYER, r"decoder.decoder.layers.\1."),  # self_attn
    (r"model\.decoder\.query_pos_head\.", r"decoder.query_pos_head."),
    (r"model\.decoder\.class_embed\.", r"decoder.dec_score_head."),
    (r"model\.decoder\.bbox_embed\.", r"decoder.dec_bbox_head."),
    (r"model\.enc_output\.0\.", r"decoder.enc_output.proj."),
    (r"model\.enc_output\.1\.", r"decoder.enc_output.norm."),
    (r"model\.(enc_score_head|enc_bbox_head|denoising_class_embed)\.", r"decoder.\1."),
    (r"model\.weight_embedding\.", r"decoder.tgt_embed."),
]
# The ResNet's own layer names, after the prefix is mapped.
_BACKBONE_LEAVES = [(r"\.convolution\.", ".conv."), (r"\.normalization\.", ".norm.")]
# Attention output projections: "out_proj" in files, "o_proj" in transformers 5.x modules.
_ATTENTION_OUTPUT = (r"\.self_attn\.o_proj\.", ".self_attn.out_proj.")
# transformers keeps separate q/k/v projections where this model (and the original) has nn.MultiheadAttention.
_QKV = re.compile(r"^(.*\.self_attn)\.(q|k|v)_proj\.(weight|bias)$")


def _skip_transformers_key(key: str, keys: set[str]) -> bool:
    # Derived from num_points (rebuilt from the config); backbone norms are frozen (no batch counter);
    # the heads outside `model.` are tied copies of `model.decoder.*` that some versions also write.
    if key.endswith(".n_points_scale") or (key.startswith("model.backbone.") and key.endswith("num_batches_tracked")):
        return True
    head = re.match(r"^(class_embed|bbox_embed)\.", key)
    return bool(head) and any(k.startswith(f"model.decoder.{head[1]}.") for k in keys)


def map_transformers_state_dict(state: dict) -> dict:
    """A transformers RTDetrV2ForObjectDetection state dict (as saved, or as its modules name them) under this
    model's names; raises on a key that no rule maps."""
    mapped, unmapped, qkv = {}, [], {}
    keys = set(state)
    for key, tensor in state.items():
        if _skip_transformers_key(key, keys):
            continue
        if re.match(r"^(class_embed|bbox_embed)\.", key):
            key = "model.decoder." + key
        for pattern, replacement in TRANSFORMERS_KEY_MAP:
            new, count = re.subn("^" + pattern, replacement, key)
            if count:
                break
        else:
            unmapped.append(key)
            continue
        if new.startswith("backbone."):
            for pattern, replacement in _BACKBONE_LEAVES:
                new = re.sub(pattern, replacement, new)
        new = re.sub(*_ATTENTION_OUTPUT, new)
        match = _QKV.match(new)
        if match:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = tensor
        else:
            mapped[new] = tensor
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unmapped.append(f"{prefix}.[q|k|v]_proj.{kind} (only {sorted(parts)} present)")
            continue
        mapped[f"{prefix}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if unmapped:
        raise CheckpointError(f"no mapping for these transformers keys: {sorted(unmapped)}")
    return mapped


def config_from_transformers(values: dict, **overrides) -> RTDETRv2Config:
    """This model's configuration from a transformers RTDetrV2Config (config.json as a dict)."""
    if values.get("model_type") not in (None, "rt_detr_v2"):
        raise CheckpointError(f"config.json is for model_type {values.get('model_type')!r}, expected 'rt_detr_v2'")
    backbone = values.get("backbone_config") or {}
    if backbone.get("model_type", "rt_detr_resnet") != "rt_detr_resnet" or values.get("use_timm_backbone"):
        raise CheckpointError("only the RT-DETR ResNet-vd backbone (model_type 'rt_detr_resnet') is supported")
    for name, expected in (("downsample_in_first_stage", False), ("hidden_act", "relu"), ("num_channels", 3)):
        if backbone.get(name, expected) != expected:
            raise CheckpointError(f"backbone_config.{name}={backbone[name]!r} is not supported (expected {expected!r})")
    for name in ("layer_norm_eps", "batch_norm_eps"):
        if values.get(name, 1e-5) != 1e-5:
            raise CheckpointError(f"{name}={values[name]} is not supported (the model uses 1e-5)")
    block = backbone.get("layer_type", "bottleneck")
    stem = backbone.get("embedding_size", 64)
    widths = list(backbone.get("hidden_sizes", [256, 512, 1024, 2048]))
    # transformers' ResNet builds a strided 1x1 shortcut (no pooling) where a downsampling stage keeps its width,
    # and no projection where a bottleneck's first stage keeps it; RT-DETRv2's backbone never does either.
    for i, (ch_in, ch_out) in enumerate(zip([stem] + widths[:-1], widths)):
        if ch_in == ch_out and (i > 0 or block == "bottleneck"):
            raise CheckpointError(f"backbone stage {i} keeps its width ({ch_out}); only widening stages are supported")
    out_indices = backbone.get("out_indices") or [2, 3, 4]
    levels = values.get("num_feature_levels", 3)
    if values.get("decoder_n_levels", levels) != levels:
        raise CheckpointError(f"decoder_n_levels ({values['decoder_n_levels']}) != num_feature_levels ({levels})")
    # As transformers counts classes: id2label's entries, else num_labels, else its default of 2 (which
    # transformers 5 saves as neither); read_transformers_checkpoint checks it against the class heads.
    id2label = values.get("id2label") or {}
    num_classes = len(id2label) if id2label else values.get("num_labels", 2)
    labels = [id2label.get(str(i), id2label.get(i, f"class_{i}")) for i in range(num_classes)]
    fields = dict(
        backbone_block=block, backbone_depths=list(backbone.get("depths", [3, 4, 6, 3])), backbone_stem_channels=stem,
        backbone_channels=widths, backbone_return_idx=[i - 1 for i in out_indices],
        # Only a bottleneck block has a 1x1 convolution that can stride; for basic blocks it changes nothing.
        backbone_stride_in_1x1=block == "bottleneck" and bool(backbone.get("downsample_in_bottleneck", False)),
        feat_strides=list(values.get("feat_strides", [8, 16, 32])),
        encoder_hidden_dim=values.get("encoder_hidden_dim", 256),
        use_encoder_idx=list(values.get("encode_proj_layers", [2])),
        num_encoder_layers=values.get("encoder_layers", 1), encoder_heads=values.get("encoder_attention_heads", 8),
        encoder_ffn_dim=values.get("encoder_ffn_dim", 1024),
        encoder_activation=values.get("encoder_activation_function", "gelu"),
        normalize_before=values.get("normalize_before", False), expansion=values.get("hidden_expansion", 1.0),
        activation=values.get("activation_function", "silu"),
        pe_temperature=float(values.get("positional_encoding_temperature", 10000)),
        num_classes=num_classes, labels=labels, hidden_dim=values.get("d_model", 256),
        decoder_in_channels=list(values.get("decoder_in_channels", [256, 256, 256])), num_levels=levels,
        num_points=values.get("decoder_n_points", 4), decoder_heads=values.get("decoder_attention_heads", 8),
        num_decoder_layers=values.get("decoder_layers", 6), decoder_ffn_dim=values.get("decoder_ffn_dim", 1024),
        decoder_activation=values.get("decoder_activation_function", "relu"),
        num_queries=values.get("num_queries", 300), num_denoising=values.get("num_denoising", 100),
        label_noise_ratio=values.get("label_noise_ratio", 0.5), box_noise_scale=values.get("box_noise_scale", 1.0),
        learn_query_content=values.get("learn_initial_query", False),
        offset_scale=values.get("decoder_offset_scale", 0.5), cross_attn_method=values.get("decoder_method", "default"),
        dropout=values.get("dropout", 0.0),
        **{name: float(values[name]) for name in CRITERION_FIELDS if name in values},
    )
    if values.get("encoder_in_channels") not in (None, [widths[i - 1] for i in out_indices]):
        raise CheckpointError(f"encoder_in_channels {values['encoder_in_channels']} do not match the backbone's "
                              f"returned stages {[widths[i - 1] for i in out_indices]}")
    fields.update(overrides)
    return RTDETRv2Config(**fields)


def transformers_config(config: RTDETRv2Config) -> dict:
    """The transformers RTDetrV2Config arguments of the same architecture (the inverse of
    config_from_transformers), e.g. to build transformers' model for a side-by-side comparison."""
    last_layer = config.eval_idx % config.num_decoder_layers == config.num_decoder_layers - 1
    for name, supported in (("eval_idx", last_layer), ("query_select_method", config.query_select_method == "default"),
                            ("depth_mult", config.depth_mult == 1.0)):
        if not supported:
            raise ValueError(f"transformers' RT-DETRv2 has no equivalent of {name}={getattr(config, name)!r}")
    if len(set(config.num_points)) != 1:
        raise ValueError(f"transformers' RT-DETRv2 takes one point count for every level, not {config.num_points}")
    backbone = dict(model_type="rt_detr_resnet", layer_type=config.backbone_block, depths=config.backbone_depths,
                    embedding_size=config.backbone_stem_channels, hidden_sizes=config.backbone_channels,
                    out_indices=[i + 1 for i in config.backbone_return_idx],
                    downsample_in_bottleneck=config.backbone_stride_in_1x1)
    return dict(
        backbone_config=backbone, feat_strides=config.feat_strides, encoder_hidden_dim=config.encoder_hidden_dim,
        encoder_in_channels=config.encoder_in_channels, encode_proj_layers=config.use_encoder_idx,
        encoder_layers=config.num_encoder_layers, encoder_attention_heads=config.encoder_heads,
        encoder_ffn_dim=config.encoder_ffn_dim, encoder_activation_function=config.encoder_activation,
        normalize_before=config.normalize_before, hidden_expansion=config.expansion,
        activation_function=config.activation, positional_encoding_temperature=int(config.pe_temperature),
        num_labels=config.num_classes, id2label=dict(enumerate(config.labels)), d_model=config.hidden_dim,
        decoder_in_channels=config.decoder_in_channels, num_feature_levels=config.num_levels,
        decoder_n_levels=config.num_levels, decoder_n_points=config.num_points[0],
        decoder_attention_heads=config.decoder_heads, decoder_layers=config.num_decoder_layers,
        decoder_ffn_dim=config.decoder_ffn_dim, decoder_activation_function=config.decoder_activation,
        num_queries=config.num_queries, num_denoising=config.num_denoising,
        label_noise_ratio=config.label_noise_ratio, box_noise_scale=config.box_noise_scale,
        learn_initial_query=config.learn_query_content, decoder_offset_scale=config.offset_scale,
        decoder_method=config.cross_attn_method, dropout=config.dropout,
        **{name: getattr(config, name) for name in CRITERION_FIELDS},
    )


def read_transformers_checkpoint(directory: str, **overrides) -> tuple[RTDETRv2Config, dict]:
    """The configuration and state dict in a directory written by transformers' save_pretrained (config.json
    and model.safetensors, or pytorch_model.bin). `overrides` change configuration fields that do not affect
    the weights, such as attention_backend, fused_attention or num_top_queries."""
    with open(os.path.join(directory, "config.json")) as handle:
        config = config_from_transformers(json.load(handle), **overrides)
    safetensors_path = os.path.join(directory, "model.safetensors")
    if os.path.exists(safetensors_path):
        from safetensors.torch import load_file

        state = load_file(safetensors_path)
    else:
        state = torch.load(os.path.join(directory, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    state = map_transformers_state_dict(state)
    heads = state.get("decoder.dec_score_head.0.weight")
    if heads is not None and heads.shape[0] != config.num_classes:
        raise CheckpointError(f"{directory}: config.json gives {config.num_classes} classes (id2label / num_labels) "
                              f"but the checkpoint's class heads have {heads.shape[0]}")
    return config, state


# --------------------------------------------------------------------------------------------------------
# Original RT-DETRv2 training checkpoints (.pth from rtdetrv2_pytorch's solver)
# --------------------------------------------------------------------------------------------------------

# Buffers of the original that this model derives from its configuration at run time: the eval-size anchors
# and valid mask (rebuilt for the actual input size), 1/num_points per point, and the frozen backbone norms'
# batch counters (r18/r34 train their backbone norms, so theirs are regular BatchNorm2d).
_ORIGINAL_DERIVED = re.compile(r"^decoder\.(anchors|valid_mask)$|\.num_points_scale$|^backbone\..*\.num_batches_tracked$")


def original_state_dict(checkpoint: dict) -> dict:
    """The model's state dict inside an original checkpoint: its EMA weights when present (what the
    original evaluates and exports), else "model"; a bare state dict passes through."""
    if "ema" in checkpoint and isinstance(checkpoint["ema"], dict):
        state = checkpoint["ema"].get("module", checkpoint["ema"])
    elif "model" in checkpoint and isinstance(checkpoint["model"], dict):
        state = checkpoint["model"]
    else:
        state = checkpoint
    return {key.removeprefix("module."): value for key, value in state.items()}


def map_original_state_dict(state: dict) -> dict:
    """An original RT-DETRv2 state dict under this model's names: the same names, less the derived buffers."""
    return {key: value for key, value in state.items() if not _ORIGINAL_DERIVED.search(key)}


def read_original_checkpoint(path: str, config: RTDETRv2Config | str | None, **overrides
                             ) -> tuple[RTDETRv2Config, dict]:
    """The configuration and state dict of an original training checkpoint. The original's do not record the
    architecture: `config` is then an RTDETRv2Config or a preset name ("r18vd", "r50vd_m_dsp", ...).
    python_model's trainer records it ("config"), and the recorded one is used."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint.get("config"), dict):
        config = RTDETRv2Config.from_dict(checkpoint["config"])
    elif config is None:
        raise ValueError(f"{path} is an original training checkpoint: pass preset= (for example 'r18vd'), since "
                         f"it does not record the architecture")
    elif isinstance(config, str):
        config = preset(config)
    config = config.replace(**overrides) if overrides else config
    return config, map_original_state_dict(original_state_dict(checkpoint))


# --------------------------------------------------------------------------------------------------------


def load_state_dict_strictly(model: nn.Module, state: dict, source: str = "checkpoint") -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mis_shaped:
        parts = [f"{name} ({len(keys)}): {keys}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)) if keys]
        raise CheckpointError(f"{source} does not fit this configuration; " + "; ".join(parts))
    model.load_state_dict(state)


def read_pretrained(name_or_path: str, preset: str | None = None, **overrides) -> tuple[RTDETRv2Config, dict]:
    """A local transformers directory, an original .pth (with `preset`), or a Hugging Face Hub id (downloaded
    with huggingface_hub, which needs network access): its configuration and state dict."""
    if os.path.isdir(name_or_path):
        return read_transformers_checkpoint(name_or_path, **overrides)
    if os.path.isfile(name_or_path):
        return read_original_checkpoint(name_or_path, preset, **overrides)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) or name_or_path.startswith("."):
        raise FileNotFoundError(f"{name_or_path!r} is neither a file, a directory nor a Hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ImportError(f"{name_or_path!r} is not a local path; downloading it needs huggingface_hub") from error
    directory = snapshot_download(name_or_path, allow_patterns=["config.json", "*.safetensors"])
    return read_transformers_checkpoint(directory, **overrides)
