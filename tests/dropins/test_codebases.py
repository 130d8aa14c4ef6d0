"""The integrations with other codebases (rtdetrv2_kernels.integrations.ultralytics, rfdetr, lightly_train,
libreyolo) against the real packages from PyPI: models built from their own configs with random weights, run
patched and unpatched on the same inputs in fp64, the op counted. CI runs this file in a side virtualenv that
has them (scripts/test_integrations.sh); without a package its tests skip with the reason."""

from __future__ import annotations

import os

import pytest
import torch

import rtdetrv2_kernels

# The packages look for the network at import (ultralytics' online check, albumentations' version check).
os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(autouse=True)
def _fp64():
    """The models in fp64 (tensors they create inside included), so patched and unpatched agree to rounding."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of rtdetrv2_kernels.ms_deform_attn (every adapter looks it up per call)."""
    calls = []
    real = rtdetrv2_kernels.ms_deform_attn

    def spy(*args, **kwargs):
        calls.append(tuple(tuple(s) for s in args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(rtdetrv2_kernels, "ms_deform_attn", spy)
    return calls


def gradients(model):
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def assert_same(actual, expected, what, tolerance=(1e-9, 1e-10)):
    """Outputs (nested tuples, lists, dicts of tensors) equal to rounding: (rtol, atol), fp64's by default."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=tolerance[0], atol=tolerance[1], msg=what)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), what
        for key in expected:
            assert_same(actual[key], expected[key], f"{what}[{key!r}]", tolerance)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{what}[{i}]", tolerance)
    else:
        assert actual == expected, what


def run_core(core, *inputs):
    """core's output and the gradients of its inputs for a fixed random output gradient."""
    inputs = [t.clone().requires_grad_() for t in inputs]
    output = core(*inputs)
    grad = torch.randn(output.shape, generator=torch.Generator().manual_seed(3), dtype=output.dtype)
    return [output.detach(), *torch.autograd.grad(output, inputs, grad)]


def compare(integration, step, op_calls, expected_calls, tolerance=(1e-9, 1e-10)):
    """step() -> (outputs, gradients) unpatched, patched, and unpatched again; all equal, the op run only
    while patched."""
    expected = step()
    assert op_calls == []
    with integration.patched() as targets:
        assert targets
        actual = step()
    assert op_calls, "the patched model never called the op"
    assert expected_calls is None or len(op_calls) == expected_calls, f"the op ran {len(op_calls)} times"
    assert_same(actual, expected, "patched", tolerance)
    op_calls.clear()
    step()
    assert op_calls == [] and not integration.is_patched()
    return op_calls


# ---------------------------------------------------------------------------------------------------------
# ultralytics: RT-DETR-l
# ---------------------------------------------------------------------------------------------------------


def _rtdetr_l():
    pytest.importorskip("ultralytics", reason="ultralytics is not installed")
    from ultralytics.nn.tasks import RTDETRDetectionModel

    torch.manual_seed(0)
    model = RTDETRDetectionModel("rtdetr-l.yaml", nc=80, verbose=False).double()
    model.nc = model.yaml["nc"]  # the trainer sets it; the loss reads it
    return model


def test_ultralytics_rtdetr_l_inference_and_training_step(op_calls):
    from rtdetrv2_kernels.integrations import ultralytics as integration

    model = _rtdetr_l()
    image = torch.rand(2, 3, 160, 224, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batch = {"img": image, "batch_idx": torch.tensor([0.0, 0.0, 1.0]), "cls": torch.tensor([[1.0], [3.0], [5.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2], [0.6, 0.4, 0.3, 0.3]],
                                    dtype=torch.float64)}
    decoder_layers = len(model.model[-1].decoder.layers)
    # Reference boxes here land locations exactly on pixel rows (anchors on the grid, denoising boxes clipped to
    # the image), where the bilinear gradient jumps: grid_sample's rounding of 2*loc - 1 and the op's exact
    # arithmetic then take it from different sides (both correct). A tiny shift of every reference box, the
    # same patched or not, moves them off those points.
    for layer in model.model[-1].decoder.layers:
        layer.cross_attn.register_forward_pre_hook(lambda module, args: (args[0], args[1] + 1.2345e-7, *args[2:]))

    def inference():
        model.eval()
        with torch.no_grad():
            return model(image)[0]

    def training_step():
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # the denoising queries are random
        loss = model.loss(batch)[0]
        loss.sum().backward()
        return loss.detach(), gradients(model)

    compare(integration, inference, op_calls, decoder_layers)
    compare(integration, training_step, op_calls, decoder_layers)


def test_ultralytics_both_location_layouts():
    """Up to 8.4.56 locations came as (B, Q, H, L, P, 2) and weights as (B, Q, H, L, P); since 8.4.57 as
    (B, Q, H, L*P, 2) and (B, Q, H, L*P). The installed ultralytics' own function gives the expectation."""
    pytest.importorskip("ultralytics", reason="ultralytics is not installed")
    from ultralytics.nn.modules import utils

    from rtdetrv2_kernels.integrations.ultralytics import multi_scale_deformable_attn

    generator = torch.Generator().manual_seed(3)
    shapes = [[6, 10], [3, 5], [2, 3]]
    value = torch.randn(2, sum(h * w for h, w in shapes), 4, 8, generator=generator, dtype=torch.float64)
    locations = torch.rand(2, 7, 4, 3, 4, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(2, 7, 4, 3, 4, generator=generator, dtype=torch.float64)
    flat = (locations.flatten(3, 4), weights.flatten(3, 4))
    installed = flat if utils.multi_scale_deformable_attn_pytorch.__code__.co_varnames.count("num_total_points") \
        else (locations, weights)
    expected = utils.multi_scale_deformable_attn_pytorch(value, shapes, *installed)
    torch.testing.assert_close(multi_scale_deformable_attn(value, shapes, *flat), expected)
    torch.testing.assert_close(multi_scale_deformable_attn(value, shapes, locations, weights), expected)


# ---------------------------------------------------------------------------------------------------------
# rfdetr: RF-DETR nano
# ---------------------------------------------------------------------------------------------------------


def test_rfdetr_nano_inference_and_training_step(op_calls):
    pytest.importorskip("rfdetr", reason="rfdetr is not installed")
    from rfdetr.config import RFDETRNanoConfig, TrainConfig
    from rfdetr.models import build_criterion_from_config, build_model_from_config

    from rtdetrv2_kernels.integrations import rfdetr as integration

    torch.manual_seed(0)
    model_config = RFDETRNanoConfig(pretrain_weights=None, device="cpu")
    train_config = TrainConfig(dataset_dir=".", output_dir=".")
    model = build_model_from_config(model_config, train_config).double()
    criterion, _ = build_criterion_from_config(model_config, train_config)
    image = torch.rand(1, 3, 192, 224, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    targets = [{"labels": torch.tensor([1, 5]),
                "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]], dtype=torch.float64)}]
    decoder_layers = model_config.dec_layers

    def inference():
        model.eval()
        with torch.no_grad():
            outputs = model(image)
        return outputs["pred_logits"], outputs["pred_boxes"]

    def training_step():
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        outputs = model(image, targets)
        losses = criterion(outputs, targets)
        loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
        loss.backward()
        return loss.detach(), gradients(model)

    compare(integration, inference, op_calls, decoder_layers)
    compare(integration, training_step, op_calls, decoder_layers)


# ---------------------------------------------------------------------------------------------------------
# lightly-train: LT-DETR with the RT-DETRv2 and the D-FINE decoder
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["dinov2/_vittest14-ltdetr", "dinov2/_vittest14-ltdetrv2"])
def test_lightly_train_ltdetr(model_name, op_calls):
    pytest.importorskip("lightly_train", reason="lightly-train is not installed")
    from lightly_train._task_models.ltdetr_object_detection.task_model import LTDETRObjectDetection

    from rtdetrv2_kernels.integrations import lightly_train as integration

    # lightly-train computes its box heads in fp32 whatever the model's dtype: compared in fp32.
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    model = LTDETRObjectDetection(model_name=model_name, classes={0: "a"}, image_size=(224, 224),
                                  load_weights=False)
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    targets = [{"labels": torch.tensor([0, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])}]
    attention = [m for m in model.modules() if type(m).__name__ == "MSDeformableAttention"]

    def training_forward():
        model.train()
        torch.manual_seed(2)
        raw = model._forward_train(image, targets)
        return raw["pred_logits"].detach(), raw["pred_boxes"].detach()

    compare(integration, training_forward, op_calls, None, tolerance=(1e-5, 1e-6))
    # Gradients: in fp32 this tiny model (1 channel per head) amplifies rounding through its norms, so the
    # attention core is compared on the inputs the model gives it, in fp64: lightly-train's own against the
    # patched core, outputs and all gradients.
    captured = []
    original_core = attention[0].ms_deformable_attn_core
    attention[0].ms_deformable_attn_core = lambda *args: captured.append(args) or original_core(*args)
    training_forward()
    attention[0].ms_deformable_attn_core = original_core
    with integration.patched():
        patched_core = attention[0].ms_deformable_attn_core
    assert patched_core.func.__module__ == "rtdetrv2_kernels.compat"
    value, shapes, locations, weights, points = captured[0]
    fp64 = [t.detach().double() for t in (value, locations, weights)]
    expected = run_core(lambda v, l, w: original_core(v, shapes, l, w, points), *fp64)
    actual = run_core(lambda v, l, w: patched_core(v, shapes, l, w, points), *fp64)
    assert_same(actual, expected, "the attention core in fp64")
    # The ONNX export path rebinds the core with method="bilinear_gather": lightly-train's own, patched or not.
    with integration.patched():
        for module in attention:
            module.convert_to_onnx_export()
            assert module.ms_deformable_attn_core.keywords["method"] == "bilinear_gather"
            assert module.ms_deformable_attn_core.func.__module__.startswith("lightly_train")


# ---------------------------------------------------------------------------------------------------------
# libreyolo: the ms_deform_attn slot (equal point counts) and the v2 adapter (D-FINE's ragged [3, 6, 3])
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["rtdetrv2-r18", "dfine-s"])
def test_libreyolo_models(family, op_calls):
    pytest.importorskip("libreyolo", reason="libreyolo is not installed")
    from libreyolo.models.dfine.nn import LibreDFINEModel
    from libreyolo.models.rtdetrv2.nn import RTDETRv2Model

    from rtdetrv2_kernels.integrations import libreyolo as integration

    torch.manual_seed(0)
    if family == "dfine-s":  # num_points [3, 6, 3]: libreyolo's slot refuses it and runs grid_sample
        model = LibreDFINEModel("s", eval_spatial_size=(160, 160))
    else:
        model = RTDETRv2Model(num_classes=80, backbone_depth=18, eval_spatial_size=(160, 160))
    model = model.double()
    for module in model.modules():  # off the pixel rows, as in the ultralytics test
        if type(module).__name__ == "MSDeformableAttention":
            module.register_forward_pre_hook(lambda module, args: (args[0], args[1] + 1.2345e-7, *args[2:]))
    image = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def step():
        model.eval()
        model.zero_grad(set_to_none=True)
        outputs = model(image)
        (outputs["pred_logits"].sum() + outputs["pred_boxes"].sum()).backward()
        return outputs["pred_logits"].detach(), outputs["pred_boxes"].detach(), gradients(model)

    compare(integration, step, op_calls, None)
    assert not integration.is_patched()
    from libreyolo import kernels

    assert integration.PROVIDER_NAME not in [name for name, _ in kernels.iter_impls("ms_deform_attn")]
