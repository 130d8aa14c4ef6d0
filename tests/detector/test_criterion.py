"""python_model's training criterion against transformers' RT-DETR loss (an implementation written
elsewhere): the whole model's loss with the same weights, images and targets, and the criterion alone on
the same outputs, denoising groups and encoder proposals included."""

from __future__ import annotations

import pytest
import torch
from model_helpers import IMAGE, relative_error, tiny_model, tiny_transformers_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")
pytest.importorskip("safetensors")

from python_model import build_criterion, load_transformers_model  # noqa: E402


def make_targets(counts, num_classes=3, seed=0):
    """One target per image with `count` random boxes (cx, cy, w, h normalized; labels in range)."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for count in counts:
        size = torch.rand(count, 2, generator=generator) * 0.4 + 0.05
        center = size / 2 + torch.rand(count, 2, generator=generator) * (1 - size)
        targets.append({"class_labels": torch.randint(0, num_classes, (count,), generator=generator),
                        "boxes": torch.cat([center, size], 1)})
    return targets


@pytest.fixture(scope="module")
def images():
    return torch.rand(IMAGE, generator=torch.Generator().manual_seed(3))


CONFIGS = [
    dict(block="basic", levels=3, layers=2, method="default", counts=(3, 1)),
    dict(block="bottleneck", levels=3, layers=3, method="default", counts=(2, 0)),  # an image without boxes
    dict(block="basic", levels=4, layers=3, method="discrete", counts=(5, 4)),
    dict(block="basic", levels=3, layers=2, method="default", counts=(12, 7)),  # as many boxes as queries
]


@pytest.mark.parametrize("settings", CONFIGS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_the_models_loss_equals_transformers(settings, images, tmp_path):
    # transformers computes the loss when given labels; without denoising (num_denoising=0) both models see
    # the same queries. Train mode on both sides: the encoder's BatchNorm then uses batch statistics.
    *architecture, counts = settings.values()
    reference = tiny_transformers_model(**dict(zip(("block", "levels", "layers", "method"), architecture)),
                                        num_denoising=0)
    reference.save_pretrained(tmp_path)
    model = load_transformers_model(str(tmp_path)).train()
    reference.train()
    targets = make_targets(counts)
    expected = reference(pixel_values=images, labels=targets)
    losses = build_criterion(model.config)(model(images, targets), targets)
    assert set(losses) == set(expected.loss_dict) | {"loss"}
    for name, value in expected.loss_dict.items():
        assert relative_error(losses[name], value) <= 1e-5, name
    assert relative_error(losses["loss"], expected.loss) <= 1e-5


def transformers_layout(outputs):
    """Our training outputs in the layout transformers' RTDetrLoss reads: the auxiliary layers, then the
    encoder proposals, as "auxiliary_outputs"; the denoising layers and their metadata."""
    def rename(output):
        return {"logits": output["pred_logits"], "pred_boxes": output["pred_boxes"]}

    layout = {**rename(outputs), "auxiliary_outputs": [rename(o) for o in outputs["aux_outputs"]]
              + [rename(o) for o in outputs["enc_aux_outputs"]]}
    if "dn_aux_outputs" in outputs:
        layout["dn_auxiliary_outputs"] = [rename(o) for o in outputs["dn_aux_outputs"]]
        layout["denoising_meta_values"] = outputs["dn_meta"]
    return layout


@pytest.mark.parametrize("counts", [(3, 1), (0, 2), (4, 4, 1)])
@pytest.mark.parametrize("method", ["default", "discrete"])
def test_the_criterion_equals_transformers_with_denoising_groups(counts, method):
    from transformers.loss.loss_rt_detr import RTDetrLoss

    model = tiny_model(method).train()
    images = torch.rand(len(counts), 3, 64, 96, generator=torch.Generator().manual_seed(1))
    targets = make_targets(counts)
    outputs = model(images, targets)
    assert "dn_aux_outputs" in outputs
    losses = build_criterion(model.config)(outputs, targets)
    expected = RTDetrLoss(transformers.RTDetrV2Config(num_labels=3))(transformers_layout(outputs), targets)
    assert set(losses) == set(expected) | {"loss"}
    assert {name for name in losses if "_dn_" in name} == {f"{t}_dn_{i}" for t in ("loss_vfl", "loss_bbox", "loss_giou")
                                                            for i in range(model.config.num_decoder_layers)}
    for name, value in expected.items():
        assert relative_error(losses[name], value) <= 1e-5, name
    assert relative_error(losses["loss"], sum(expected.values())) <= 1e-5


def test_images_without_boxes_and_gradients():
    model = tiny_model().train()
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = build_criterion(model.config)(model(images, empty), empty)
    assert not any("_dn_" in name for name in losses)  # no ground truth: no denoising queries
    assert all(losses[name].item() == 0 for name in losses if "bbox" in name or "giou" in name)
    assert losses["loss"].item() > 0  # every query is pushed towards "no object"
    losses["loss"].backward()
    assert model.decoder.dec_score_head[-1].weight.grad.abs().sum() > 0

    model.zero_grad()
    targets = make_targets((2, 0))
    losses = build_criterion(model.config)(model(images, targets), targets)
    losses["loss"].backward()
    value_proj = model.decoder.decoder.layers[0].cross_attn.value_proj.weight
    assert value_proj.grad.abs().sum() > 0, "no gradient through the attention kernel"


def test_class_agnostic_proposals_are_matched_as_one_class():
    model = tiny_model(query_select_method="agnostic").train()
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    targets = make_targets((3, 2))
    outputs = model(images, targets)
    assert outputs["enc_aux_outputs"][0]["pred_logits"].shape[-1] == 1
    losses = build_criterion(model.config)(outputs, targets)
    assert torch.isfinite(losses["loss"]) and f"loss_vfl_aux_{model.config.num_decoder_layers - 1}" in losses


@pytest.mark.parametrize(
    "target, message",
    [
        ({"boxes": torch.zeros(1, 4)}, r"targets\[1\] needs 'labels'"),
        ({"labels": torch.tensor([0.5]), "boxes": torch.zeros(1, 4)}, r"targets\[1\]\['labels'\] must be a 1-D integer"),
        ({"labels": torch.tensor([0, 1]), "boxes": torch.zeros(1, 4)}, r"targets\[1\]\['boxes'\] must be a \(2, 4\)"),
        ({"labels": torch.tensor([3]), "boxes": torch.rand(1, 4)}, r"targets\[1\]\['labels'\] must lie in \[0, 3\)"),
    ],
)
def test_bad_targets_name_the_image_and_field(target, message):
    model = tiny_model().train()
    good = make_targets((1,))[0]
    outputs = model(torch.rand(2, 3, 64, 96), [good, make_targets((1,))[0]])
    with pytest.raises(ValueError, match=message):
        build_criterion(model.config)(outputs, [good, target])
    with pytest.raises(ValueError, match="model.train"):
        build_criterion(model.config)(model.eval()(torch.rand(2, 3, 64, 96)), [good, good])
