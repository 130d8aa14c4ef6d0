"""ONNX export and onnxruntime helpers shared by tests/op/test_onnx.py (the op) and tests/detector/test_model_export.py
(python_model). Callers skip first when onnx, onnxruntime, openvino or onnxscript is missing."""

from __future__ import annotations

import warnings

import torch

from python_model import export as export_module


def export(module, inputs, **kwargs):
    """The ModelProto of torch.onnx.export (the dynamo exporter) of module in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), inputs, dynamo=True, verbose=False, **kwargs)
    return program.model_proto


def export_at(module, inputs, tmp_path, opset=None, dynamic_batch=False, bilinear="gather"):
    """The ModelProto that python_model.export.write_onnx writes (the exporter chosen by opset, the opset
    checked), with generic input and output names."""
    import onnx

    names = [f"input{i}" for i in range(len(inputs))]
    path = export_module.write_onnx(module, inputs, tmp_path / "graph.onnx", opset=opset, dynamic_batch=dynamic_batch,
                                    input_names=names, output_names=["output"], bilinear=bilinear)
    return onnx.load(str(path))


def run_onnxruntime(model, inputs):
    """Every output of the model run by onnxruntime on CPU."""
    return export_module.run_onnxruntime(model.SerializeToString(), inputs)


def run_openvino(model, inputs):
    """Every output of the model run by OpenVINO's CPU plugin, in fp32 (see python_model.export)."""
    return export_module.run_openvino(model.SerializeToString(), inputs)


def operators(model):
    """The (domain, op type) pairs of the graph's nodes."""
    return {(node.domain or "ai.onnx", node.op_type) for node in model.graph.node}
