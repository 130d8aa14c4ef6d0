"""End to end: python_model's RT-DETRv2 against Hugging Face transformers' RTDetrV2ForObjectDetection holding
the same (random) weights, 640x640 inference, side by side in interleaved rounds. Both are checked to give the
same logits and boxes before they are timed."""

from __future__ import annotations

import copy

import torch

from . import timing
from .requirements import missing

TITLE = "End-to-end model"
MODEL_PRESETS = ("r18vd", "r50vd")
IMAGE_SIZE = 640
# CPU: batch 1 in float32; GPU: batches 1 and 8 in float16 (the targets).
SETTINGS = {"cpu": [(1, torch.float32)], "cuda": [(1, torch.float16), (8, torch.float16)]}
QUICK = {"presets": ("r18vd",), "image_size": 320}


def unavailable_reason() -> str | None:
    """Why the section cannot run here, or None."""
    return missing(["transformers"])


def build_pair(name: str, device: str, dtype):
    """(transformers model, our model) of preset `name` with the same weights."""
    import transformers

    from python_model import RTDETRv2, preset
    from python_model.checkpoints import load_state_dict_strictly, map_transformers_state_dict, transformers_config

    config = preset(name)
    arguments = transformers_config(config)
    backbone = {k: v for k, v in arguments.pop("backbone_config").items() if k != "model_type"}
    arguments["backbone_config"] = transformers.RTDetrResNetConfig(**backbone)
    torch.manual_seed(0)
    theirs = transformers.RTDetrV2ForObjectDetection(transformers.RTDetrV2Config(**arguments)).eval()
    ours = RTDETRv2(config).eval()
    load_state_dict_strictly(ours, map_transformers_state_dict(theirs.state_dict()), source="transformers")
    theirs, ours = theirs.to(device=device, dtype=dtype), ours.to(device=device, dtype=dtype)
    return theirs, ours


def check_pair(theirs, ours, images, dtype) -> str | None:
    with torch.no_grad():
        expected = theirs(pixel_values=images)
        actual = ours(images)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, e in (("logits", actual["pred_logits"], expected.logits),
                       ("boxes", actual["pred_boxes"], expected.pred_boxes)):
        error = ((a.float() - e.float()).abs().max() / e.float().abs().max()).item()
        if not error <= tolerance:
            return f"{name}: relative error {error:.2e} > {tolerance:.0e}"
    return None


def time_models(device: str, rounds: int, budget_s: float, threads: int, quick: bool = False) -> list[dict]:
    presets = QUICK["presets"] if quick else MODEL_PRESETS
    size = QUICK["image_size"] if quick else IMAGE_SIZE
    rows = []
    for name in presets:
        for batch, dtype in SETTINGS[device]:
            theirs, ours = build_pair(name, device, dtype)
            deployed = copy.deepcopy(ours).deploy()
            images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
            for label, model in (("python_model", ours), ("python_model deployed", deployed)):
                mismatch = check_pair(theirs, model, images, dtype)
                if mismatch:
                    raise AssertionError(f"{label} and transformers disagree on {name} ({dtype}): {mismatch}")

            def run(model, transformers_style):
                def call():
                    with torch.no_grad():
                        model(pixel_values=images) if transformers_style else model(images)
                return call

            measured = timing.measure({"python_model": run(ours, False), "python_model deployed": run(deployed, False),
                                       "transformers": run(theirs, True)}, device, rounds, budget_s, threads)
            row = {"model": name, "device": device, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
                   "image": size}
            timing.record(row, measured)
            row["speedup"] = row["transformers ms"] / row["python_model ms"]
            row["speedup deployed"] = row["transformers ms"] / row["python_model deployed ms"]
            rows.append(row)
            del theirs, ours, deployed
    return rows


def markdown(rows: list[dict]) -> str:
    return timing.comparison_table(
        TITLE,
        "python_model's RT-DETRv2 (decoder on this package's fused op), as loaded and after `deploy()` (norms "
        "folded into convolutions, RepVGG branches merged), against transformers' RTDetrV2ForObjectDetection with "
        "the same weights: inference, median ms per call (± interquartile range over the median); speedups are "
        "transformers' time over ours.",
        rows, ["model", "device", "dtype", "batch", "image"], ["python_model", "python_model deployed", "transformers"],
        ["speedup", "speedup deployed"])
