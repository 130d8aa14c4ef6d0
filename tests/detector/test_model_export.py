"""python_model under torch.compile, torch.export, ONNX export (run by onnxruntime) and DistributedDataParallel:
the whole tiny model, as test_registration.py, test_onnx.py and test_ddp.py check the op alone."""

from __future__ import annotations

import copy
import functools
import logging
import os
import subprocess
import sys

import pytest
import torch
from distributed import WORLD, assert_ranks_match, gradients, requires_gloo, save_ddp_gradients, spawn
from helpers import GPU_KERNELS, capture_cuda_graph, needs_gpu_kernels
from model_helpers import randomize_, relative_error, tiny_model, tiny_transformers_model, training_loss

from rtdetrv2_kernels.backends import unavailable_reason

IMAGE_SIZE = (64, 96)
ENCODER_POSITIONS = 8 * 12 + 4 * 6 + 2 * 3  # the levels at strides 8, 16 and 32
# (cross_attn_method, fused attention): ms_deform_attn_fused, or the locations and softmax in PyTorch and then
# ms_deform_attn.
VARIANTS = [("default", True), ("default", False), ("discrete", True), ("discrete", False)]
# Training variants, fewer for time: each method once and each attention path once.
TRAINING_VARIANTS = [("default", True), ("discrete", False)]


def variant_id(variant):
    method, fused = variant
    return f"{method}-{'fused' if fused else 'plain'}"


def random_model(method, fused, **overrides):
    return randomize_(tiny_model(method, **overrides)).set_attention(fused=fused)


def make_images(batch, seed, dtype=torch.float32):
    return torch.rand((batch, 3, *IMAGE_SIZE), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_targets(batch):
    """Two ground-truth boxes per image: with equal counts, each image's denoising queries do not depend on the
    rest of the batch (their number follows the largest count in it)."""
    generator = torch.Generator().manual_seed(2)
    return [{"labels": torch.randint(0, 3, (2,), generator=generator),
             "boxes": torch.rand(2, 4, generator=generator) * 0.4 + 0.2} for _ in range(batch)]


def assert_predictions_close(actual, expected, **tolerance):
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(actual[key], expected[key], **tolerance, msg=key)


# Inductor compiles each variant in about 20 s on 2 CPU cores (the first in a process more).
@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_eval_model_compiles_without_graph_breaks(variant):
    model = random_model(*variant).eval()
    images = make_images(2, seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    with torch.no_grad():
        expected = model(images)
        actual = compiled(images)
    assert_predictions_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", TRAINING_VARIANTS, ids=variant_id)
def test_training_step_compiles_without_graph_breaks(variant):
    """The training forward with targets (denoising included) and the loss compiled as one graph, and its
    backward. The aot_eager backend captures the same forward and backward graphs as inductor without its code
    generation (minutes on 2 cores for the joint graph; inductor compiles the op's backward in
    test_registration.py). It also runs the random ops as eager does, so with the same seed the denoising
    noise, and so the gradients, are the same."""
    model = random_model(*variant).train()
    images, targets = make_images(2, seed=3), make_targets(2)

    def loss():
        return training_loss(model(images, targets))

    def step(loss_function):
        model.zero_grad()
        torch.manual_seed(1)
        value = loss_function()
        value.backward()
        return value.detach(), gradients(model)

    expected_loss, expected = step(loss)
    torch._dynamo.reset()
    actual_loss, actual = step(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(actual_loss, expected_loss, rtol=1e-6, atol=0)
    assert actual.keys() == expected.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.skipif(unavailable_reason("cpu", "cpu") is not None, reason="the C++ kernels are not built")
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_torch_export_keeps_the_kernel_with_a_dynamic_batch(variant):
    """torch.export.export of the eval model (64x96 images, batch size dynamic): the program holds the C++
    custom op once per decoder layer and reproduces eager at other batch sizes."""
    method, fused = variant
    model = random_model(method, fused).eval().set_attention(backend="cpu", fused=fused)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (make_images(2, seed=3),), dynamic_shapes=({0: batch},))
    forward = "ms_deform_attn_fused_forward" if fused else "ms_deform_attn_forward"
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    kernel_calls = [target for target in targets if target.startswith("rtdetrv2_kernels.")]
    assert kernel_calls == [f"rtdetrv2_kernels.{forward}.default"] * model.config.num_decoder_layers
    for batch in (2, 3, 1):
        images = make_images(batch, seed=batch)
        actual = program.module()(images)
        with torch.no_grad():
            expected = model(images)
        assert_predictions_close(actual, expected, rtol=1e-5, atol=1e-6)


# (method, bilinear form, fused attention, opset, dynamic batch): every sampling form, each attention path,
# opset 17 (TorchScript exporter) with a fixed batch and the dynamo exporter's default with a dynamic one.
ONNX_CASES = [(method, bilinear, fused, opset, dynamic)
              for method, bilinear in [("default", "gather"), ("default", "grid_sample"), ("discrete", "gather")]
              for fused, opset, dynamic in [(True, 17, False), (False, None, True)]]


def onnx_case_id(case):
    method, bilinear, fused, opset, dynamic = case
    return (f"{method}-{bilinear}-{'fused' if fused else 'plain'}-opset{opset or 'default'}-"
            f"{'dynamic' if dynamic else 'static'}")


@pytest.mark.slow  # about 10 s an export
@pytest.mark.parametrize("case", ONNX_CASES, ids=onnx_case_id)
def test_onnx_export_matches_in_onnxruntime_and_openvino(case, tmp_path):
    """The deployed detector (python_model.export), query selection (TopK) included: standard operators only,
    GridSample only where asked for; onnxruntime and OpenVINO on the CPU reproduce PyTorch's logits and boxes
    to 1e-5 (relative to their largest value), at two batch sizes where the batch is dynamic."""
    onnx = pytest.importorskip("onnx")
    for module in ("onnxruntime", "onnxscript", "openvino"):
        pytest.importorskip(module)
    from python_model.export import DeployedDetector, compare, export_onnx, graph_operators, graph_opset

    method, bilinear, fused, opset, dynamic = case
    detector = DeployedDetector(random_model(method, fused).eval().deploy())
    path = export_onnx(detector, tmp_path / "model.onnx", bilinear=bilinear, dynamic_batch=dynamic, opset=opset)
    onnx.checker.check_model(str(path))
    ops = graph_operators(path)
    assert ("GridSample" in ops) == (method == "default" and bilinear == "grid_sample"), sorted(ops)
    assert "TopK" in ops
    assert opset is None or graph_opset(path) == opset
    for batch in (2, 3) if dynamic else (1,):
        for runtime in ("onnxruntime", "openvino"):
            comparison = compare(path, detector, runtime, batch=batch)
            assert comparison.worst() <= 1e-5, comparison.describe()


@pytest.mark.slow
def test_onnx_export_with_postprocessing_and_half_precision(tmp_path):
    """The top-k post-processing inside the graph (scores, labels, boxes in pixels), and a float16 graph held
    against the float32 model (onnxruntime; a tolerance for float16's 11 bits)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from python_model.export import DeployedDetector, compare, export_onnx, graph_input_dtype

    model = random_model("default", True).eval().deploy()
    detector = DeployedDetector(model, postprocess=True)
    path = export_onnx(detector, tmp_path / "post.onnx", dynamic_batch=True)
    for batch in (2, 3):
        comparison = compare(path, detector, batch=batch)
        assert comparison.max_abs_error["labels"] == 0, comparison.describe()
        assert comparison.worst() <= 1e-5, comparison.describe()
    half = export_onnx(DeployedDetector(copy.deepcopy(model).half()), tmp_path / "half.onnx")
    assert graph_input_dtype(half) == torch.float16
    assert compare(half, DeployedDetector(model)).worst() <= 1e-2


def test_onnx_export_keeps_the_exporters_notes_on_its_internals_quiet(tmp_path, caplog):
    """The dynamo exporter logs a warning per Split it does not constant-fold (16 for this model) and per
    torchvision op it skips: noise in every export's output (and the benchmark's) that users cannot act on."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from python_model.export import DeployedDetector, export_onnx

    export_onnx(DeployedDetector(random_model("default", True).eval().deploy()), tmp_path / "model.onnx")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_cli_export(tmp_path):
    """python -m python_model export: deploys, writes, checks in onnxruntime and prints the comparison."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    tiny_transformers_model().save_pretrained(tmp_path / "weights")
    command = [sys.executable, "-m", "python_model", "export", "--weights", str(tmp_path / "weights"), "--out",
               str(tmp_path / "model.onnx"), "--method", "discrete", "--dynamic-batch", "--image-size", "64", "96"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("exporting") and "discrete sampling" in lines[0] and "Bx3x64x96" in lines[0], lines
    assert any("GridSample absent" in line and "outputs logits, boxes" in line for line in lines), lines
    checks = [line for line in lines if line.startswith("check against the PyTorch model")]
    assert len(checks) == 2 and all("onnxruntime" in line for line in checks), lines  # batches 1 and 2
    bad = subprocess.run(command[:-3] + ["--opset", "12"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert bad.returncode == 1 and "error: the export failed" in bad.stderr and "opset version 12" in bad.stderr, bad.stderr[-2000:]


DDP_BATCH = 4


def ddp_model(method, fused):
    """The tiny model in float64 (for a tight comparison), in training mode except for BatchNorm: training-mode
    BatchNorm normalizes with each process's own shard (SyncBatchNorm, which would not, needs GPUs). No
    denoising noise (its draws follow the batch's layout), and as many queries as encoder positions: the top-k
    selection then keeps all of them and a rounding-level difference cannot change which are kept."""
    model = random_model(method, fused, num_queries=ENCODER_POSITIONS, label_noise_ratio=0.0, box_noise_scale=0.0)
    model = model.double().train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    return model


def ddp_loss(model, images, targets):
    return training_loss(model(images, targets))


def _ddp_worker(rank, out_dir):
    images, targets = make_images(DDP_BATCH, seed=5, dtype=torch.float64), make_targets(DDP_BATCH)
    shard = slice(rank * DDP_BATCH // WORLD, (rank + 1) * DDP_BATCH // WORLD)
    for variant in TRAINING_VARIANTS:  # one spawn for all: starting the processes is most of the cost
        loss = functools.partial(ddp_loss, images=images[shard], targets=targets[shard])
        save_ddp_gradients(ddp_model(*variant), loss, os.path.join(out_dir, f"{variant_id(variant)}-rank{rank}.pt"))


@requires_gloo
def test_ddp_gradients_match_single_process(tmp_path):
    """Two gloo processes, each training on half the batch with denoising, end with the gradients of one
    process on the whole batch."""
    spawn(_ddp_worker, str(tmp_path))
    for variant in TRAINING_VARIANTS:
        model = ddp_model(*variant)
        ddp_loss(model, make_images(DDP_BATCH, seed=5, dtype=torch.float64), make_targets(DDP_BATCH)).backward()
        expected = gradients(model)
        assert expected.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
        assert_ranks_match(expected, [tmp_path / f"{variant_id(variant)}-rank{rank}.pt" for rank in range(WORLD)],
                           rtol=1e-9, atol=1e-15)


@needs_gpu_kernels
@pytest.mark.parametrize("backend", GPU_KERNELS or ["none"])
def test_gpu_model_matches_cpu_compiles_and_replays_in_a_cuda_graph(backend, monkeypatch):
    """On the GPU kernels: eager equals the CPU model, torch.compile(fullgraph=True) equals eager, and the
    whole forward replays from a CUDA graph (no host synchronization inside it) on new images."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions, to compare with the CPU
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cpu_model = random_model("default", True).eval()
    model = copy.deepcopy(cpu_model).cuda().set_attention(backend=backend)
    images = make_images(2, seed=3)
    with torch.no_grad():
        expected = cpu_model(images)
        actual = model(images.cuda())
        for key in ("pred_logits", "pred_boxes"):
            assert relative_error(actual[key].cpu(), expected[key]) <= 1e-4, key
        torch._dynamo.reset()
        assert_predictions_close(torch.compile(model, fullgraph=True)(images.cuda()), actual, rtol=1e-4, atol=1e-5)

        static_images = images.cuda()
        graph, captured = capture_cuda_graph(lambda: model(static_images))
        fresh = make_images(2, seed=4).cuda()
        static_images.copy_(fresh)
        graph.replay()
        assert_predictions_close(captured, model(fresh), rtol=1e-5, atol=1e-6)
