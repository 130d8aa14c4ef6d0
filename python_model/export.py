"""ONNX export of the detector for deployment runtimes (docs/python_model.md, "Export to ONNX").

The graph's contract:

- input ``images``: (B, 3, H, W) float32 (float16 with ``half``), RGB in [0, 1], resized to the model's
  ``eval_spatial_size`` (640x640 for the published models) with bilinear filtering, no mean/std
  normalization: what :func:`python_model.preprocess` makes.
- outputs ``logits`` (B, Q, num_classes), raw (apply a sigmoid for scores), and ``boxes`` (B, Q, 4),
  (cx, cy, w, h) normalized to [0, 1]: the model's ``pred_logits`` and ``pred_boxes``.
- with ``postprocess``: a second input ``image_sizes`` (B, 2) int64, each original image's (height, width),
  and outputs ``scores`` (B, K), ``labels`` (B, K) int64 and ``boxes`` (B, K, 4) in (x0, y0, x1, y1) pixels
  of the original image, the K = ``num_top_queries`` best (query, class) pairs, best first (no NMS; as
  :meth:`RTDETRv2.postprocess` before its threshold).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import rtdetrv2_kernels

from .model import RTDETRv2


class DeployedDetector(nn.Module):
    """images -> (logits, boxes), or with postprocess (images, image_sizes) -> (scores, labels, boxes)."""

    def __init__(self, model: RTDETRv2, postprocess: bool = False):
        super().__init__()
        self.model, self.postprocess = model, postprocess

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None):
        outputs = self.model(images)
        if self.postprocess:
            return self.model.top_detections(outputs, image_sizes)
        return outputs["pred_logits"], outputs["pred_boxes"]

    def input_names(self) -> list[str]:
        return ["images", "image_sizes"] if self.postprocess else ["images"]

    def output_names(self) -> list[str]:
        return ["scores", "labels", "boxes"] if self.postprocess else ["logits", "boxes"]


def sample_inputs(detector: DeployedDetector, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A random image batch at the model's input size (and its original sizes), in the model's dtype."""
    parameter = next(detector.parameters())
    height, width = detector.model.config.eval_spatial_size
    images = torch.rand((batch, 3, height, width), generator=torch.Generator().manual_seed(seed))
    images = images.to(dtype=parameter.dtype, device=parameter.device)
    if not detector.postprocess:
        return (images,)
    return images, torch.tensor([[480, 640]] * batch, dtype=torch.int64, device=parameter.device)


# The dynamo exporter writes opset 18 and later. Asked for an older one, it converts its graph with onnx's
# version converter, which fails on graphs like these (it cannot move ReduceSum's axes back into an
# attribute) and then leaves the graph at opset 18 with only a logged warning. Older opsets therefore come
# from the TorchScript exporter, which writes them directly, and every written opset is checked.
FIRST_DYNAMO_OPSET = 18


# Loggers through which the dynamo exporter reports on its own workings (a Split it does not constant-fold,
# torchvision's ops skipped when torchvision is absent), a line per occurrence; nothing the user can act on.
EXPORTER_LOGGERS = ("onnxscript.optimizer._constant_folding", "torch.onnx._internal.exporter._registration")


@contextlib.contextmanager
def _quiet_exporter_logs():
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def write_onnx(module: nn.Module, inputs: tuple, path: str | Path, *, opset: int | None = None,
               dynamic_batch: bool = False, input_names=None, output_names=None, bilinear: str = "gather") -> Path:
    """torch.onnx.export of `module` (in eval mode) on `inputs` to `path`: the dynamo exporter at `opset`
    (None: its default), or the TorchScript exporter below opset 18. dynamic_batch makes the first dimension
    of every input and output any size (trace with a batch of 2 or more: torch.export specializes size 1).
    bilinear: how the ops write bilinear sampling (rtdetrv2_kernels.export_options)."""
    path = Path(path)
    with rtdetrv2_kernels.export_options(bilinear=bilinear), warnings.catch_warnings(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")  # the exporters' notes on their own internals, not the user's model
        if opset is not None and opset < FIRST_DYNAMO_OPSET:
            axes = None
            if dynamic_batch:
                axes = {name: {0: "batch"} for name in [*(input_names or []), *(output_names or [])]}
            torch.onnx.export(module.eval(), inputs, str(path), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_axes=axes)
        else:
            dynamic_shapes = None
            if dynamic_batch:
                size = torch.export.Dim("batch", min=1, max=1024)
                dynamic_shapes = tuple({0: size} for _ in inputs)
            options = {} if opset is None else {"opset_version": opset}
            program = torch.onnx.export(module.eval(), inputs, dynamo=True, verbose=False, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic_shapes, **options)
            program.save(str(path))
    written = graph_opset(path)
    if opset is not None and written != opset:
        raise RuntimeError(f"asked for opset {opset}, the exporter wrote opset {written}")
    return path


def export_onnx(detector: DeployedDetector, path: str | Path, *, bilinear: str = "gather", dynamic_batch: bool = False,
                opset: int | None = None, batch: int = 1) -> Path:
    """Writes the detector (deploy() it first) to `path` (see write_onnx), with a batch dimension of any
    size with dynamic_batch, else fixed at `batch`."""
    inputs = sample_inputs(detector, max(batch, 2) if dynamic_batch else batch)
    return write_onnx(detector, inputs, path, opset=opset, dynamic_batch=dynamic_batch, bilinear=bilinear,
                      input_names=detector.input_names(), output_names=detector.output_names())


@dataclass
class Comparison:
    """How the written graph's outputs, run by a runtime, differ from the PyTorch detector's."""

    runtime: str
    batch: int
    max_abs_error: dict[str, float]  # per output name
    max_relative_error: dict[str, float]  # max error / max |expected|

    def worst(self) -> float:
        return max(self.max_relative_error.values())

    def describe(self) -> str:
        errors = ", ".join(f"{name} {self.max_abs_error[name]:.2e} abs / {self.max_relative_error[name]:.2e} rel"
                           for name in self.max_abs_error)
        return f"{self.runtime} (batch {self.batch}): {errors}"


def _source(model: str | Path | bytes):
    return model if isinstance(model, bytes) else str(model)


def run_onnxruntime(model: str | Path | bytes, inputs) -> list[torch.Tensor]:
    """Every output of the graph (a file, or its serialized bytes) run by onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(_source(model), providers=["CPUExecutionProvider"])
    feeds = {arg.name: x.cpu().numpy() for arg, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(output) for output in session.run(None, feeds)]


def run_openvino(model: str | Path | bytes, inputs, precision: str | None = "f32") -> list[torch.Tensor]:
    """Every output of the graph run by OpenVINO's CPU plugin. Its default inference precision is bf16 on
    CPUs with bf16 units (convolutions and matrix products then round to 8 mantissa bits: measured here,
    boxes of the tiny test model off by 0.8), so this runs at `precision` "f32" unless told otherwise (None:
    the plugin's default)."""
    import openvino

    core = openvino.Core()
    config = {} if precision is None else {"INFERENCE_PRECISION_HINT": precision}
    compiled = core.compile_model(core.read_model(_source(model)), "CPU", config)
    results = compiled([x.cpu().numpy() for x in inputs])
    return [torch.from_numpy(results[output]) for output in compiled.outputs]


RUNTIMES = {"onnxruntime": run_onnxruntime, "openvino": run_openvino}


def _match_queries(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> list[torch.Tensor]:
    """actual's queries reordered to expected's: for each expected query (per image), the actual query whose
    outputs, all concatenated, are nearest."""
    flat_actual = torch.cat([t.double().flatten(2) for t in actual], -1)  # (B, Q, features)
    flat_expected = torch.cat([t.double().flatten(2) for t in expected], -1)
    nearest = torch.cdist(flat_expected, flat_actual).argmin(-1)  # (B, Q)
    return [t.gather(1, nearest.view(*nearest.shape, *[1] * (t.dim() - 2)).expand_as(t)) for t in actual]


def compare(path: str | Path, detector: DeployedDetector, runtime: str = "onnxruntime", batch: int = 1,
            seed: int = 1, any_query_order: bool = False) -> Comparison:
    """Runs the graph at `path` in `runtime` (CPU) and `detector` in PyTorch on the same sample input, cast to
    the graph's input dtype (so a float16 graph can be held against the float32 detector).

    any_query_order compares each PyTorch query with the nearest one of the graph: for models whose query
    selection has near-ties (random weights put every encoder score within rounding of the others), where
    the order of the selected queries, and so of the outputs, is up to each runtime's top-k."""
    inputs = sample_inputs(detector, batch, seed)
    with torch.no_grad():
        expected = detector(*inputs)
    dtype = graph_input_dtype(path)
    actual = RUNTIMES[runtime](path, [x.to(dtype) if x.is_floating_point() else x for x in inputs])
    if any_query_order:
        actual = _match_queries(actual, [e.cpu() for e in expected])
    absolute, relative = {}, {}
    for name, a, e in zip(detector.output_names(), actual, expected):
        if a.shape != e.shape:
            raise AssertionError(f"{runtime}: output {name} has shape {tuple(a.shape)}, PyTorch {tuple(e.shape)}")
        difference = (a.double() - e.double().cpu()).abs().max().item()
        absolute[name] = difference
        relative[name] = difference / max(e.double().abs().max().item(), 1e-30)
    return Comparison(runtime, batch, absolute, relative)


def graph_operators(path: str | Path) -> set[str]:
    """The operator types in the graph at `path` (ONNX's standard domain)."""
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def graph_opset(path: str | Path) -> int:
    import onnx

    return next(entry.version for entry in onnx.load(str(path)).opset_import if entry.domain in ("", "ai.onnx"))


def graph_input_dtype(path: str | Path) -> torch.dtype:
    """The dtype of the graph's first input (the images)."""
    import onnx

    element_type = onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type
    return {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16}[element_type]
