"""ONNX export and onnxruntime helpers shared by tests/test_onnx.py (the op) and tests/test_model_export.py
(python_model). Callers skip first when onnx, onnxruntime or onnxscript is missing."""

from __future__ import annotations

import warnings

import torch


def export(module, inputs, **kwargs):
    """The ModelProto of torch.onnx.export (the dynamo exporter) of module in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), inputs, dynamo=True, verbose=False, **kwargs)
    return program.model_proto


def run_onnxruntime(model, inputs):
    """Every output of the model run by onnxruntime on CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(output) for output in session.run(None, feeds)]


def operators(model):
    """The (domain, op type) pairs of the graph's nodes."""
    return {(node.domain or "ai.onnx", node.op_type) for node in model.graph.node}
