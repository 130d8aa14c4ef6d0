"""python_model: parity with Hugging Face transformers' RTDetrV2ForObjectDetection (an implementation written
elsewhere) loaded from its own save_pretrained directories, the original checkpoints' key mapping, the
published presets, training through the kernels, the fused attention core, and the CLI."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_helpers import IMAGE, relative_error, tiny_model, tiny_transformers_model, training_loss

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import python_model  # noqa: E402
import rtdetrv2_kernels  # noqa: E402
from python_model import (  # noqa: E402
    PRESETS,
    CheckpointError,
    RTDETRv2,
    load_original_checkpoint,
    load_pretrained,
    load_transformers_model,
    preset,
    preprocess,
)
from python_model.checkpoints import map_transformers_state_dict  # noqa: E402
from python_model.layers import FrozenBatchNorm2d  # noqa: E402

@pytest.fixture(scope="module")
def images():
    return torch.rand(IMAGE, generator=torch.Generator().manual_seed(3))


CONFIGS = [
    dict(block="basic", levels=3, layers=2, method="default"),
    dict(block="bottleneck", levels=3, layers=3, method="default"),
    dict(block="basic", levels=4, layers=3, method="default"),
    dict(block="bottleneck", levels=4, layers=2, method="discrete"),
    dict(block="basic", levels=3, layers=2, method="discrete", points=2),
]


@pytest.mark.parametrize("settings", CONFIGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_matches_transformers(settings, images, tmp_path):
    reference = tiny_transformers_model(**settings)
    reference.save_pretrained(tmp_path)
    model = load_transformers_model(str(tmp_path))
    assert model.config.num_levels == settings["levels"]
    assert model.config.cross_attn_method == settings["method"]
    with torch.no_grad():
        expected = reference(pixel_values=images)
        actual = model(images)
    assert relative_error(actual["pred_logits"], expected.logits) <= 1e-4
    assert relative_error(actual["pred_boxes"], expected.pred_boxes) <= 1e-4

    sizes = torch.tensor([[480, 640], [300, 200]])
    processor = transformers.RTDetrImageProcessor()
    expected_detections = processor.post_process_object_detection(expected, threshold=0.3, target_sizes=sizes)
    detections = model.postprocess(actual, sizes, threshold=0.3)
    for ours, theirs in zip(detections, expected_detections):
        assert ours["labels"].tolist() == theirs["labels"].tolist()
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-4, atol=1e-3)
    assert sum(len(d["scores"]) for d in detections) > 0, "the comparison saw no detection"


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_fused_attention_matches_the_unfused_path(method, images, tmp_path):
    tiny_transformers_model(levels=4, method=method).save_pretrained(tmp_path)
    model = load_transformers_model(str(tmp_path))
    calls = {"fused": 0, "plain": 0}
    fused_op, plain_op = rtdetrv2_kernels.ms_deform_attn_fused, rtdetrv2_kernels.ms_deform_attn

    def count(kind, op):
        def spy(*args, **kwargs):
            calls[kind] += 1
            return op(*args, **kwargs)
        return spy

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rtdetrv2_kernels, "ms_deform_attn_fused", count("fused", fused_op))
        patch.setattr(rtdetrv2_kernels, "ms_deform_attn", count("plain", plain_op))
        with torch.no_grad():
            fused = model(images)
            assert calls == {"fused": 2, "plain": 0}  # fused by default, one call per decoder layer
            unfused = model.set_attention(fused=False)(images)
            assert calls == {"fused": 2, "plain": 2}
    assert relative_error(fused["pred_logits"], unfused["pred_logits"]) <= 1e-5
    assert relative_error(fused["pred_boxes"], unfused["pred_boxes"]) <= 1e-5


def test_backends_agree(images, tmp_path):
    tiny_transformers_model(levels=3).save_pretrained(tmp_path)
    model = load_transformers_model(str(tmp_path))
    with torch.no_grad():
        outputs = {b: model.set_attention(backend=b)(images) for b in rtdetrv2_kernels.available_backends()
                   if b in ("cpu", "torch")}
    assert relative_error(outputs["cpu"]["pred_logits"], outputs["torch"]["pred_logits"]) <= 1e-5


# Names taken from the original RT-DETRv2 code (rtdetrv2_pytorch): its checkpoints hold exactly these.
ORIGINAL_KEYS = [
    "backbone.conv1.conv1_1.conv.weight", "backbone.conv1.conv1_3.norm.running_var",
    "backbone.res_layers.0.blocks.0.short.conv.weight", "backbone.res_layers.1.blocks.0.short.conv.conv.weight",
    "backbone.res_layers.1.blocks.1.branch2b.norm.weight", "encoder.input_proj.2.conv.weight",
    "encoder.input_proj.0.norm.running_mean", "encoder.encoder.0.layers.0.self_attn.in_proj_weight",
    "encoder.encoder.0.layers.0.self_attn.out_proj.weight", "encoder.encoder.0.layers.0.linear1.weight",
    "encoder.encoder.0.layers.0.norm2.bias", "encoder.lateral_convs.0.conv.weight",
    "encoder.fpn_blocks.1.bottlenecks.2.conv2.norm.weight", "encoder.pan_blocks.0.conv1.conv.weight",
    "encoder.downsample_convs.1.norm.bias", "decoder.input_proj.0.conv.weight", "decoder.input_proj.0.norm.weight",
    "decoder.decoder.layers.0.self_attn.in_proj_bias", "decoder.decoder.layers.1.cross_attn.sampling_offsets.weight",
    "decoder.decoder.layers.1.cross_attn.attention_weights.bias", "decoder.decoder.layers.0.cross_attn.value_proj.weight",
    "decoder.decoder.layers.0.norm3.weight", "decoder.decoder.layers.0.linear2.bias",
    "decoder.denoising_class_embed.weight", "decoder.query_pos_head.layers.1.weight", "decoder.enc_output.proj.weight",
    "decoder.enc_output.norm.bias", "decoder.enc_score_head.weight", "decoder.enc_bbox_head.layers.2.bias",
    "decoder.dec_score_head.1.weight", "decoder.dec_bbox_head.1.layers.0.weight",
]


def original_checkpoint(tmp_path, reference):
    """transformers weights re-keyed to the original layout, with what the original's state dict carries
    beyond this model's (eval-size anchors, 1/num_points buffers, batch counters), in its EMA wrapper."""
    from safetensors.torch import load_file

    reference.save_pretrained(tmp_path / "hf")
    state = map_transformers_state_dict(load_file(tmp_path / "hf" / "model.safetensors"))
    state["decoder.anchors"] = torch.zeros(1, 126, 4)
    state["decoder.valid_mask"] = torch.ones(1, 126, 1, dtype=torch.bool)
    state["decoder.decoder.layers.0.cross_attn.num_points_scale"] = torch.full((12,), 0.25)
    state["backbone.conv1.conv1_1.norm.num_batches_tracked"] = torch.tensor(7)
    path = tmp_path / "rtdetrv2.pth"
    torch.save({"ema": {"module": state, "updates": 10}, "last_epoch": 3}, path)
    return path, state


def test_original_checkpoint_round_trip(images, tmp_path):
    reference = tiny_transformers_model(layers=2)
    path, state = original_checkpoint(tmp_path, reference)
    assert set(ORIGINAL_KEYS) <= set(state), sorted(set(ORIGINAL_KEYS) - set(state))
    small = dict(backbone_block="basic", backbone_depths=[1, 2, 1, 1], backbone_stem_channels=8,
                 backbone_channels=[8, 16, 24, 32], encoder_hidden_dim=16, encoder_heads=2, encoder_ffn_dim=32,
                 hidden_dim=16, decoder_in_channels=[16, 16, 16], decoder_heads=2, num_decoder_layers=2,
                 decoder_ffn_dim=32, num_queries=12, num_classes=3, labels=["a", "b", "c"], expansion=1.0)
    model = load_original_checkpoint(str(path), preset("r18vd", **small))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(images)["pred_logits"], reference(pixel_values=images).logits,
                                   rtol=1e-4, atol=1e-5)
    # A state dict under the "model" key, with DDP's "module." prefix, loads the same.
    torch.save({"model": {"module." + k: v for k, v in state.items()}}, tmp_path / "plain.pth")
    load_original_checkpoint(str(tmp_path / "plain.pth"), preset("r18vd", **small))
    with pytest.raises(CheckpointError, match=r"missing \(1\).*enc_score_head\.bias"):
        del state["decoder.enc_score_head.bias"]
        torch.save(state, tmp_path / "broken.pth")
        load_original_checkpoint(str(tmp_path / "broken.pth"), preset("r18vd", **small))
    with pytest.raises(CheckpointError, match="shape mismatch.*sampling_offsets"):  # 2 points per level, not 4
        load_original_checkpoint(str(path), preset("r18vd", **{**small, "num_points": [2, 2, 2]}))
    with pytest.raises(ValueError, match="preset="):
        load_pretrained(str(path))


def test_transformers_checkpoint_errors(tmp_path):
    reference = tiny_transformers_model()
    reference.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="shape mismatch.*sampling_offsets"):
        load_transformers_model(str(tmp_path), num_points=[2, 2, 2])
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    state["model.decoder.extra_head.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="extra_head"):
        load_transformers_model(str(tmp_path))


def test_class_count_is_taken_as_transformers_takes_it(images, tmp_path):
    # transformers 5 writes neither id2label nor num_labels for its default of 2 labels.
    reference = tiny_transformers_model(num_labels=2)
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "id2label" not in config and "num_labels" not in config
    model = load_transformers_model(str(tmp_path))
    assert model.config.num_classes == 2
    with torch.no_grad():
        assert relative_error(model(images)["pred_logits"], reference(pixel_values=images).logits) <= 1e-4
    config["id2label"] = {str(i): f"c{i}" for i in range(5)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="5 classes.*class heads have 2"):
        load_transformers_model(str(tmp_path))


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_downsample_in_bottleneck_is_honoured_where_transformers_honours_it(block, images, tmp_path):
    # Only a bottleneck block has a 1x1 convolution to stride; for basic blocks the setting changes nothing.
    reference = tiny_transformers_model(block, backbone=dict(downsample_in_bottleneck=True))
    reference.save_pretrained(tmp_path)
    model = load_transformers_model(str(tmp_path))
    assert model.config.backbone_stride_in_1x1 == (block == "bottleneck")
    with torch.no_grad():
        expected = reference(pixel_values=images)
        actual = model(images)
    assert relative_error(actual["pred_logits"], expected.logits) <= 1e-4
    assert relative_error(actual["pred_boxes"], expected.pred_boxes) <= 1e-4


def test_python_model_imports_run_one_way():
    # No two modules import each other, also through imports inside functions (model.py once imported
    # checkpoints.py lazily while checkpoints.py imported model.py).
    package = Path(python_model.__file__).parent
    imports = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        imports[path.stem] = {alias.name.split(".")[0] if node.module is None else node.module.split(".")[0]
                              for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
                              for alias in node.names}
    imports.pop("__init__")

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in imports.get(start, ()))

    cycles = sorted(m for m in imports if reaches(m, m))
    assert not cycles, f"modules on an import cycle: {cycles}"
    assert "checkpoints" in imports["model"] and "model" not in imports["checkpoints"]


def test_hub_ids_download_with_huggingface_hub(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    tiny_transformers_model().save_pretrained(tmp_path)
    requested = []

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        requested.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = RTDETRv2.from_pretrained("PekingU/rtdetr_v2_r18vd", attention_backend="torch")
    assert requested == [("PekingU/rtdetr_v2_r18vd", ["config.json", "*.safetensors"])]
    assert model.config.attention_backend == "torch" and not model.training


# Parameter counts the RT-DETRv2 paper and repository publish, in millions.
PUBLISHED_PARAMETERS = {"r18vd": 20, "r34vd": 31, "r50vd_m": 36, "r50vd": 42, "r101vd": 76}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets(name):
    config = preset(name)
    with torch.device("meta"):
        model = RTDETRv2(config)
    parameters = sum(p.numel() for p in model.parameters())
    base = name.split("_sp")[0].removesuffix("_dsp")
    assert abs(parameters / 1e6 - PUBLISHED_PARAMETERS[base]) < 1.0, f"{name}: {parameters / 1e6:.2f}M"
    assert config.cross_attn_method == ("discrete" if name.endswith("_dsp") else "default")
    if "_sp" in name:
        assert config.num_points == [int(name[-1])] * 3
    dfine_like = preset(name, num_points=[3, 6, 3])
    assert dfine_like.num_points == [3, 6, 3]


def test_config_errors():
    with pytest.raises(ValueError, match="num_points must hold 3"):
        preset("r18vd", num_points=[4, 4])
    with pytest.raises(ValueError, match="cross_attn_method"):
        preset("r18vd", cross_attn_method="nearest")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("r200vd")


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_one_training_step_lowers_the_loss(method, images):
    # As many queries as encoder positions (8x12 + 4x6 + 2x3): the top-k query selection then keeps all of
    # them, so the step cannot change which are kept and the loss is smooth in the weights.
    model = tiny_model(method, num_queries=126).train()
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)  # the same denoising noise for both passes
    loss = training_loss(model(images, targets))
    loss.backward()
    value_proj = model.decoder.decoder.layers[0].cross_attn.value_proj.weight
    assert value_proj.grad is not None and value_proj.grad.abs().sum() > 0, "no gradient through the kernel"
    offsets = model.decoder.decoder.layers[0].cross_attn.sampling_offsets.weight
    assert (offsets.grad is not None and offsets.grad.abs().sum() > 0) == (method == "default")
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "decoder.decoder.layers.0.cross_attn.value_proj.weight" in changed
    assert "encoder.input_proj.0.conv.weight" in changed and "decoder.dec_score_head.1.bias" in changed
    torch.manual_seed(1)
    with torch.no_grad():
        assert training_loss(model(images, targets)).item() < loss.item()


def test_training_outputs_follow_the_original_layout(images):
    model = tiny_model().train()
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
               {"labels": torch.tensor([], dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    outputs = model(images, targets)
    assert outputs["pred_logits"].shape == (2, 12, 3) and len(outputs["aux_outputs"]) == 1
    # 8 denoising queries for at most 1 ground truth: 8 groups of one positive and one negative copy.
    assert outputs["dn_meta"]["dn_num_split"] == [16, 12] and outputs["dn_meta"]["dn_num_group"] == 8
    assert [len(i) for i in outputs["dn_meta"]["dn_positive_idx"]] == [8, 0]
    assert outputs["enc_aux_outputs"][0]["pred_boxes"].shape == (2, 12, 4)
    assert set(model.eval()(images)) == {"pred_logits", "pred_boxes"}


def test_eval_idx_stops_at_that_layer(images, tmp_path):
    """eval_idx (r50vd_m evaluates its third of six layers) gives that layer's predictions; transformers
    (which cannot build a one-layer decoder in 5.x) exposes them as its intermediate outputs."""
    reference = tiny_transformers_model(layers=3)
    reference.save_pretrained(tmp_path)
    model = load_transformers_model(str(tmp_path), eval_idx=1)
    with torch.no_grad():
        expected = reference(pixel_values=images)
        actual = model(images)
    assert relative_error(actual["pred_logits"], expected.intermediate_logits[:, 1]) <= 1e-4
    assert relative_error(actual["pred_boxes"], expected.intermediate_reference_points[:, 1]) <= 1e-4
    assert relative_error(actual["pred_boxes"], expected.pred_boxes) > 1e-3


def test_learned_query_content(images):
    """learn_query_content (transformers' learn_initial_query, broken there in 5.x): the decoder starts from
    learned embeddings instead of the selected encoder features."""
    model = tiny_model(learn_query_content=True).eval()
    with torch.no_grad():
        before = model(images)["pred_logits"]
        model.decoder.tgt_embed.weight.mul_(2)
        after = model(images)["pred_logits"]
    assert not torch.allclose(before, after)


def test_preprocess():
    from PIL import Image

    picture = Image.new("RGB", (50, 30), (255, 0, 128))
    tensor_image = torch.full((3, 20, 40), 51, dtype=torch.uint8)
    pixels, sizes = preprocess([picture, tensor_image], (64, 96))
    assert pixels.shape == (2, 3, 64, 96) and sizes.tolist() == [[30, 50], [20, 40]]
    torch.testing.assert_close(pixels[0, :, 10, 10], torch.tensor([1.0, 0.0, 128 / 255]))
    torch.testing.assert_close(pixels[1], torch.full((3, 64, 96), 0.2))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(torch.zeros(3, 8, 8))


def test_cli_predict(tmp_path):
    from PIL import Image

    tiny_transformers_model().save_pretrained(tmp_path / "weights")
    Image.new("RGB", (96, 64), (30, 90, 200)).save(tmp_path / "image.png")
    command = [sys.executable, "-m", "python_model", "predict", "--weights", str(tmp_path / "weights"),
               "--image", str(tmp_path / "image.png"), "--out", str(tmp_path / "out.png"), "--threshold", "0.0",
               "--backend", "torch"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("12 detections with score > 0.0")  # the 12 best of 12 queries x 3 classes
    assert len([line for line in lines if "LABEL_" in line]) == 12
    assert Image.open(tmp_path / "out.png").size == (96, 64)
    missing = subprocess.run(command[:5] + [str(tmp_path / "nowhere.pth")] + command[6:8], capture_output=True,
                             text=True, cwd=tmp_path, timeout=300)
    assert missing.returncode == 2 and "nowhere.pth" in missing.stderr


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_deploy_folds_norms_and_keeps_the_outputs(method, images):
    model = tiny_model(method).eval()
    with torch.no_grad():
        # Non-trivial running statistics and affine parameters, so that folding them is visible.
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                module.running_mean.copy_(torch.randn_like(module.running_mean) * 0.2)
                module.running_var.copy_(torch.rand_like(module.running_var) + 0.5)
                module.weight.copy_(torch.rand_like(module.weight) + 0.5)
                module.bias.copy_(torch.randn_like(module.bias) * 0.2)
        expected = model(images)
        convs_before = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        actual = model.deploy()(images)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())
    # The 1x1 branches of the RepVGG blocks are gone: 2 top-down + 2 bottom-up CSP blocks of 3 each.
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == convs_before - 4 * 3
    assert relative_error(actual["pred_logits"], expected["pred_logits"]) <= 1e-5
    assert relative_error(actual["pred_boxes"], expected["pred_boxes"]) <= 1e-5
    with pytest.raises(RuntimeError, match="deployed"):
        model.train()
