"""rtdetrv2_kernels.integrations.transformers: tiny random-weight transformers models give the same outputs
and parameter gradients patched as unpatched, actually call the op while patched, and are restored exactly."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import rtdetrv2_kernels  # noqa: E402
from rtdetrv2_kernels.integrations import transformers as integration  # noqa: E402

IMAGE = (2, 3, 64, 96)  # strides 8, 16, 32: levels 8x12, 4x6, 2x3 (non-square)
COMMON = dict(
    d_model=16, encoder_hidden_dim=16, encoder_in_channels=[16, 16, 16], decoder_in_channels=[16, 16, 16],
    encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
    decoder_layers=2, num_queries=10, num_denoising=0, num_labels=3,
)
STAGES = ["stage2", "stage3", "stage4"]


@pytest.fixture(autouse=True)
def _always_unpatched():
    integration.unpatch()
    yield
    integration.unpatch()


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of rtdetrv2_kernels.ms_deform_attn (every adapter looks it up per call)."""
    calls = []
    real = rtdetrv2_kernels.ms_deform_attn

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(rtdetrv2_kernels, "ms_deform_attn", spy)
    return calls


def _resnet_backbone():
    return transformers.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                           layer_type="basic", out_features=STAGES)


def _hgnet_backbone():
    return transformers.HGNetV2Config(
        embedding_size=8, stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 16, 16],
        stage_mid_channels=[8, 8, 8, 8], stage_out_channels=[16, 16, 16, 16], stage_num_blocks=[1, 1, 1, 1],
        stage_numb_of_layers=[1, 1, 1, 1], hidden_sizes=[16, 16, 16, 16], depths=[1, 1, 1, 1], out_features=STAGES,
    )


def rt_detr_v2(method):
    config = transformers.RTDetrV2Config(backbone_config=_resnet_backbone(), decoder_method=method, **COMMON)
    return transformers.RTDetrV2ForObjectDetection(config), 2  # one op call per decoder layer


def d_fine(method):
    config = transformers.DFineConfig(backbone_config=_hgnet_backbone(), decoder_n_points=[3, 6, 3],
                                      decoder_method=method, **COMMON)
    return transformers.DFineForObjectDetection(config), 2


def deimv2(method):
    config = transformers.Deimv2Config(backbone_config=_hgnet_backbone(), decoder_n_points=[3, 6, 3],
                                       decoder_method=method, **COMMON)
    return transformers.Deimv2ForObjectDetection(config), 2


def deformable_detr(method):
    config = transformers.DeformableDetrConfig(
        backbone_config=transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16],
                                                  depths=[1, 1, 1, 1], layer_type="basic", out_features=STAGES),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, num_feature_levels=3,
        encoder_n_points=2, decoder_n_points=3, num_labels=3, dropout=0.0,
    )
    return transformers.DeformableDetrForObjectDetection(config), 3  # encoder layer + decoder layers


MODELS = [
    pytest.param(rt_detr_v2, "default", id="rt_detr_v2"),
    pytest.param(rt_detr_v2, "discrete", id="rt_detr_v2-discrete"),
    pytest.param(d_fine, "default", id="d_fine"),
    pytest.param(d_fine, "discrete", id="d_fine-discrete"),
    pytest.param(deimv2, "default", id="deimv2"),
    pytest.param(deformable_detr, "default", id="deformable_detr"),
]


def run(model, pixel_values):
    """Logits, boxes and every parameter's gradient for a fixed random projection of the outputs."""
    model.zero_grad(set_to_none=True)
    outputs = model(pixel_values=pixel_values)
    generator = torch.Generator().manual_seed(7)
    loss = (outputs.logits * torch.randn(outputs.logits.shape, generator=generator, dtype=torch.float64)).sum()
    loss = loss + (outputs.pred_boxes * torch.randn(outputs.pred_boxes.shape, generator=generator,
                                                     dtype=torch.float64)).sum()
    loss.backward()
    # None stays None: transformers' discrete sampling passes the locations no gradient, and patched it must not.
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    return outputs.logits.detach(), outputs.pred_boxes.detach(), grads


def off_pixel_centres(model):
    """Deformable DETR's initial offsets are whole pixels from pixel-centre reference points: locations sit
    exactly where the bilinear gradient jumps, and two correct implementations may round to either side.
    Nudging the offset biases moves every location off those points."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("sampling_offsets.bias"):
                parameter += torch.rand(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.2 + 0.1
    return model


@pytest.mark.parametrize("build,method", MODELS)
def test_patched_model_matches_unpatched(build, method, op_calls):
    torch.manual_seed(0)
    model, calls_per_forward = build(method)
    model = off_pixel_centres(model.double().eval())
    pixel_values = torch.randn(IMAGE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    logits, boxes, grads = run(model, pixel_values)
    assert op_calls == []
    with integration.patched():
        patched_logits, patched_boxes, patched_grads = run(model, pixel_values)
    assert len(op_calls) == calls_per_forward, "the patched model did not run on rtdetrv2_kernels"
    assert [tuple(shape) for shape in op_calls[0]] == [(8, 12), (4, 6), (2, 3)]

    torch.testing.assert_close(patched_logits, logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(patched_boxes, boxes, rtol=1e-9, atol=1e-9)
    assert patched_grads.keys() == grads.keys()
    assert {n for n, g in patched_grads.items() if g is None} == {n for n, g in grads.items() if g is None}
    for name in grads:
        if grads[name] is not None:
            torch.testing.assert_close(patched_grads[name], grads[name], rtol=1e-7, atol=1e-9, msg=name)
    offsets = [g for name, g in grads.items() if "sampling_offsets" in name]
    assert all(g is None for g in offsets) if method == "discrete" else any(g.abs().sum() > 0 for g in offsets)

    op_calls.clear()
    run(model, pixel_values)
    assert op_calls == [], "unpatch() left the model on rtdetrv2_kernels"


def training_targets():
    boxes = [[[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]], [[0.5, 0.5, 0.4, 0.4]]]
    return [{"class_labels": torch.tensor(labels), "boxes": torch.tensor(b, dtype=torch.float64)}
            for labels, b in zip(([0, 2], [1]), boxes)]


def own_loss(model, pixel_values):
    return model(pixel_values=pixel_values, labels=training_targets()).loss


def projected_loss(model, pixel_values):
    outputs = model(pixel_values=pixel_values)
    generator = torch.Generator().manual_seed(7)
    return sum((x * torch.randn(x.shape, generator=generator, dtype=x.dtype)).sum()
               for x in (outputs.logits, outputs.pred_boxes))


# RT-DETRv2 trains on transformers' own loss; D-FINE's (transformers 5.24) cannot run in fp64 (it writes
# fp64 values into an fp32 buffer), so it trains on a fixed projection of its outputs.
TRAINING = [pytest.param(rt_detr_v2, own_loss, id="rt_detr_v2"), pytest.param(d_fine, projected_loss, id="d_fine")]


@pytest.mark.parametrize("build,loss_of", TRAINING)
@pytest.mark.parametrize("method", ["default", "discrete"])
def test_patched_training_steps_leave_the_same_parameters(build, loss_of, method):
    """A few AdamW steps with weight decay, transformers' own loss, patched and unpatched, from the same
    weights: the same parameters. With discrete sampling the offset layers get no gradient either way, so
    weight decay leaves them alone (zeros instead of None would decay them). eps=1e-2 keeps AdamW's update
    continuous in the gradient: with the default 1e-8, an entry whose gradient is within rounding of zero
    would flip its update's sign between two correct implementations. In fp64, and with BatchNorm on its
    running statistics (eval mode): with batch statistics the tiny random D-FINE's gradients reach 1e10, and
    their rounding alone differs between any two implementations."""
    torch.manual_seed(0)
    start, _ = build(method)
    start = off_pixel_centres(start.double().eval())
    pixel_values = torch.rand(IMAGE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    trained = []
    for patch in (False, True):
        model = copy.deepcopy(start)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, eps=1e-2)
        # Two steps: a third forward can match a query to another box once the tiny numerical differences
        # have moved the weights (D-FINE does here), and from then on the runs train differently.
        for step in range(2):
            torch.manual_seed(step)  # the same denoising noise on both sides
            optimizer.zero_grad(set_to_none=True)
            with integration.patched() if patch else contextlib.nullcontext():
                loss_of(model, pixel_values).backward()
            optimizer.step()
        trained.append(dict(model.named_parameters()))
    unpatched, patched = trained
    for name, parameter in unpatched.items():
        torch.testing.assert_close(patched[name], parameter, rtol=1e-9, atol=1e-9, msg=name)
    offsets = [name for name in unpatched if "sampling_offsets" in name]
    moved = [not torch.equal(unpatched[name], dict(start.named_parameters())[name]) for name in offsets]
    assert not any(moved) if method == "discrete" else all(moved)


def test_dfine_modules_built_while_patched_are_restored(op_calls):
    """D-FINE stores its core on each attention module at construction: a model built while patched uses the
    op, and after unpatch() runs transformers' function like any other."""
    pixel_values = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with integration.patched():
        model, _ = d_fine("default")
        model = model.double().eval()
        model(pixel_values=pixel_values)
    assert len(op_calls) == 2
    op_calls.clear()
    model(pixel_values=pixel_values)
    assert op_calls == []
    module = transformers.models.d_fine.modeling_d_fine
    core = model.model.decoder.layers[0].encoder_attn.ms_deformable_attn_core
    assert core is module.multi_scale_deformable_attention_v2


def test_dfine_instance_with_its_own_core_keeps_it():
    model, _ = d_fine("default")
    attention = model.model.decoder.layers[0].encoder_attn

    def custom(*args):
        raise AssertionError("unused")

    attention.ms_deformable_attn_core = custom
    with integration.patched():
        assert attention.ms_deformable_attn_core is custom
        other = model.model.decoder.layers[1].encoder_attn
        assert other.ms_deformable_attn_core is integration.multi_scale_deformable_attention_v2


def _snapshot():
    """What every target attribute is now (the object itself, or its absence from a class's own dict)."""
    state = {}
    for owner, name, _, description in integration._targets():
        state[description] = owner.__dict__.get(name, "absent") if isinstance(owner, type) else getattr(owner, name)
    return state


def test_patch_is_idempotent_and_unpatch_restores_exactly():
    before = _snapshot()
    assert len(before) >= 4
    targets = integration.patch()
    assert integration.is_patched()
    assert sorted(targets) == sorted(before)
    during = _snapshot()
    assert all(during[key] is not before[key] for key in before)
    assert integration.patch() == targets  # a second patch changes nothing
    assert all(_snapshot()[key] is during[key] for key in before)
    integration.unpatch()
    assert not integration.is_patched()
    after = _snapshot()
    assert all(after[key] is before[key] for key in before)
    integration.unpatch()  # no-op
    assert all(_snapshot()[key] is before[key] for key in before)


def test_patched_context_nests():
    with integration.patched():
        with integration.patched():
            pass
        assert integration.is_patched()  # the inner block did not patch, so it does not unpatch
    assert not integration.is_patched()
    with pytest.raises(RuntimeError):
        with integration.patched():
            raise RuntimeError("boom")
    assert not integration.is_patched()


def _v1_layout_inputs():
    generator = torch.Generator().manual_seed(3)
    shapes = [(4, 6), (2, 3), (1, 2)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 2, 4, generator=generator, dtype=torch.float64)
    locations = torch.rand(2, 5, 2, len(shapes), 3, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(2, 5, 2, len(shapes), 3, generator=generator, dtype=torch.float64)
    return shapes, value, locations, weights


def test_every_layer_and_function_target_computes_the_same(op_calls):
    """Each swapped MultiScaleDeformableAttention.forward and module function, called directly, matches
    what it replaced."""
    shapes, value, locations, weights = _v1_layout_inputs()
    spatial_shapes = torch.tensor(shapes)
    starts = torch.tensor([0, 24, 30])
    checked = 0
    for owner, name, _, description in list(integration._targets()):
        if name == "forward":  # Deformable DETR's layer layout
            def call():
                return owner()(value, spatial_shapes, shapes, starts, locations, weights, 64)
        elif name == "multi_scale_deformable_attention":
            def call():
                return getattr(owner, name)(value, shapes, locations, weights)
        else:
            continue
        expected = call()
        with integration.patched():
            calls = len(op_calls)
            actual = call()
            assert len(op_calls) == calls + 1, description
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10, msg=description)
        checked += 1
    assert checked >= 3


# ---------------------------------------------------------------------------------------------------------
# The Hugging Face kernels hub: transformers >= 5.25 kernelizes MultiScaleDeformableAttention layers by
# binding a hub layer's forward to each instance.
# ---------------------------------------------------------------------------------------------------------

def _kernels():
    return pytest.importorskip("kernels", reason="the kernels package is not installed")


def _model_and_input():
    torch.manual_seed(0)
    model, calls_per_forward = deformable_detr("default")
    return off_pixel_centres(model.double().eval()), calls_per_forward, torch.rand(*IMAGE, dtype=torch.float64)


def _other_hub_layer(tmp_path):
    """A local layer repository whose layer runs transformers' own forward (stands in for the Hub's
    deformable-detr kernel, which needs CUDA and a download)."""
    variant = tmp_path / "build" / "torch-universal"
    variant.mkdir(parents=True)
    (variant / "metadata.json").write_text(
        '{"id": "rtdetrv2_kernels_test_other_layer", "name": "other-msda", "version": 1, "license": "apache-2.0", '
        '"python-depends": [], "backend": {"type": "universal"}}')
    (variant / "__init__.py").write_text("from . import layers\n")
    (variant / "layers.py").write_text(
        "from torch import nn\n"
        "from transformers.models.deformable_detr import modeling_deformable_detr as m\n"
        "class MultiScaleDeformableAttention(nn.Module):\n"
        "    forward = m.MultiScaleDeformableAttention.__dict__['forward']\n")
    return tmp_path


@pytest.mark.parametrize("mode", ["INFERENCE", "TRAINING"])
def test_kernelize_with_the_package_layer_runs_the_op(mode, op_calls):
    kernels = _kernels()
    from rtdetrv2_kernels.integrations import kernels_hub

    model, calls_per_forward, pixel_values = _model_and_input()
    expected = run(model, pixel_values)
    with kernels.use_kernel_mapping(kernels_hub.kernel_mapping(), inherit_mapping=False):
        kernels.kernelize(model, mode=getattr(kernels.Mode, mode), device="cpu")
    layer = next(m for m in model.modules() if type(m).__name__ == "MultiScaleDeformableAttention")
    assert "forward" in layer.__dict__  # what kernelize leaves: an instance-level forward
    actual = run(model, pixel_values)
    assert len(op_calls) == calls_per_forward
    torch.testing.assert_close(actual[:2], expected[:2], rtol=1e-10, atol=1e-10)
    for name, grad in expected[2].items():
        torch.testing.assert_close(actual[2][name], grad, rtol=1e-9, atol=1e-10, msg=name)


def test_patch_takes_over_kernelized_layers_and_unpatch_gives_them_back(tmp_path, op_calls):
    kernels = _kernels()
    model, calls_per_forward, pixel_values = _model_and_input()
    repository = kernels.LocalLayerRepository(_other_hub_layer(tmp_path), layer_name="MultiScaleDeformableAttention")
    with kernels.use_kernel_mapping({"MultiScaleDeformableAttention": {"cpu": repository}}, inherit_mapping=False):
        kernels.kernelize(model, mode=kernels.Mode.INFERENCE, device="cpu")
    layers = [m for m in model.modules() if type(m).__name__ == "MultiScaleDeformableAttention"]
    hub_forwards = [layer.__dict__["forward"] for layer in layers]
    expected = run(model, pixel_values)
    assert op_calls == []  # the other layer's forward ran
    integration.patch()
    actual = run(model, pixel_values)
    assert len(op_calls) == calls_per_forward
    torch.testing.assert_close(actual[:2], expected[:2], rtol=1e-10, atol=1e-10)
    integration.unpatch()
    assert [layer.__dict__["forward"] for layer in layers] == hub_forwards
    op_calls.clear()
    run(model, pixel_values)
    assert op_calls == []


def test_patch_keeps_an_instance_forward_set_otherwise(op_calls):
    model, _, pixel_values = _model_and_input()
    layer = next(m for m in model.modules() if type(m).__name__ == "MultiScaleDeformableAttention")
    own = type(layer).forward.__get__(layer)  # a user's own instance-level forward (no kernels involved)
    layer.forward = own
    integration.patch()
    assert layer.forward is own
    integration.unpatch()
    assert layer.forward is own


def test_kernel_config_names_the_packaged_layer():
    _kernels()
    from rtdetrv2_kernels.integrations import kernels_hub

    config = kernels_hub.kernel_config()
    assert (kernels_hub.repository_path() / "build" / "torch-universal" / "metadata.json").is_file()
    assert str(kernels_hub.repository_path()) in repr(config.kernel_mapping)
