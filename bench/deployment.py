"""The exported detector in deployment runtimes: python_model's R18 written to ONNX (python_model.export) with
bilinear sampling as corner gathers and as GridSample, and with discrete sampling, run by onnxruntime and
OpenVINO on the CPU, against python_model (deployed) in PyTorch on the same CPU, the same weights and image,
in interleaved rounds. Every graph is checked against PyTorch before it is timed."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from . import timing
from .requirements import missing

TITLE = "Deployment runtimes (CPU)"
PRESET = "r18vd"
IMAGE_SIZE = 640
QUICK_IMAGE_SIZE = 320
FORMS = [("default", "gather"), ("default", "grid_sample"), ("discrete", "gather")]
RUNTIMES = ["onnxruntime", "openvino f32", "openvino default precision"]


def unavailable_reason() -> str | None:
    """Why the section cannot run here, or None."""
    return missing(["onnx", "onnxscript", "onnxruntime", "openvino"])


def _runners(path: Path, images: torch.Tensor, threads: int) -> dict:
    """name -> a function running the graph at `path` once on `images`, each runtime on `threads` threads."""
    import onnxruntime
    import openvino

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images.numpy()}
    core = openvino.Core()
    compiled = {
        precision: core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": threads, **({"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" else {})})
        for precision in ("f32", "default")
    }
    requests = {precision: model.create_infer_request() for precision, model in compiled.items()}
    array = images.numpy()
    return {
        "onnxruntime": lambda: session.run(None, feed),
        "openvino f32": lambda: requests["f32"].infer([array]),
        "openvino default precision": lambda: requests["default"].infer([array]),
    }


def random_weights() -> dict:
    """R18's initial weights, with the attention's offset layers perturbed: initialized, they put every
    sampling point on the pixel grid's midpoints, where the nearest pixel of discrete sampling flips with the
    last bit of the location (any two runtimes then disagree there, as trained weights almost never make them)."""
    from python_model import RTDETRv2, preset

    torch.manual_seed(0)
    model = RTDETRv2(preset(PRESET))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "sampling_offsets" in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.state_dict()


def time_deployment(rounds: int, budget_s: float, threads: int, quick: bool = False) -> list[dict]:
    from python_model import RTDETRv2, preset
    from python_model.export import DeployedDetector, compare, export_onnx

    size = QUICK_IMAGE_SIZE if quick else IMAGE_SIZE
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    weights = random_weights()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for method, bilinear in FORMS:
            model = RTDETRv2(preset(PRESET, cross_attn_method=method, eval_spatial_size=[size, size]))
            model.load_state_dict(weights)
            detector = DeployedDetector(model.eval().deploy())
            path = export_onnx(detector, Path(directory) / f"{method}-{bilinear}.onnx", bilinear=bilinear)
            for runtime in ("onnxruntime", "openvino"):
                # Random weights leave the encoder's scores within rounding of each other: runtimes order the
                # selected queries differently, so queries are matched before comparing.
                comparison = compare(path, detector, runtime, any_query_order=True)
                if not comparison.worst() <= 1e-4:
                    raise AssertionError(f"the exported graph disagrees with PyTorch: {comparison.describe()}")

            def pytorch():
                with torch.no_grad():
                    detector(images)

            measured = timing.measure({"python_model (PyTorch)": pytorch, **_runners(path, images, threads)}, "cpu",
                                      rounds, budget_s, threads)
            row = {"model": PRESET, "method": method, "bilinear": bilinear if method == "default" else "-",
                   "batch": 1, "image": size}
            timing.record(row, measured)
            for runtime in RUNTIMES:
                row[f"speedup {runtime}"] = row["python_model (PyTorch) ms"] / row[f"{runtime} ms"]
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    return timing.comparison_table(
        TITLE,
        "python_model's R18 detector (deployed: norms folded, RepVGG merged; random weights) exported to ONNX with "
        "`python_model.export`, float32, batch 1: bilinear sampling written as corner gathers (the default) or "
        "as GridSample, and discrete sampling; run by onnxruntime and by OpenVINO's CPU plugin (at f32, and at "
        "its default inference precision, which is bf16 on CPUs with bf16 units), against python_model in "
        "PyTorch on the same CPU and threads. Every graph is first checked against PyTorch (1e-4 relative, "
        "OpenVINO at f32; queries matched first, as random weights leave near-tied query scores whose order "
        "each runtime's top-k breaks its own way). Median ms per call (± interquartile range over the median); speedups are PyTorch's time over "
        "the runtime's.",
        rows, ["model", "method", "bilinear", "batch", "image"], ["python_model (PyTorch)", *RUNTIMES],
        [f"speedup {runtime}" for runtime in RUNTIMES])
