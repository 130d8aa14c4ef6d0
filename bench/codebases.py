"""Other codebases' detectors patched to run on this package's op (rtdetrv2_kernels.integrations), against
themselves as they are: ultralytics' RT-DETR-l, Roboflow's RF-DETR nano and base, and a transformers RT-DETR
through the Hugging Face kernels hub layer. Same weights (random) and inputs; the outputs are checked to
agree before anything is timed; inference and a training step (forward with targets, the codebase's own
loss, backward), in interleaved rounds. The packages live in the side virtualenv that
`bash scripts/test_integrations.sh` builds: `.venv-integrations/bin/python -m bench --codebases-only`."""

from __future__ import annotations

import copy
import os

import torch

from . import timing
from .requirements import missing

TITLE = "Other codebases, patched"
HINT = ("`bash scripts/test_integrations.sh` installs them in .venv-integrations; then run "
        "`.venv-integrations/bin/python -m bench --codebases-only`")
SETTINGS = {"image": 640, "batch": 1}
QUICK = {"image": 256, "batch": 1}
MODELS = {  # name -> the modules it needs
    "ultralytics RT-DETR-l": ["ultralytics"],
    "RF-DETR nano": ["rfdetr"],
    "RF-DETR base": ["rfdetr"],
    "transformers RT-DETR (kernels hub)": ["transformers", "kernels"],
}


def _offline() -> None:
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def missing_models() -> dict[str, str]:
    """name -> why it cannot run here, for the models whose packages are missing."""
    return {name: reason for name, modules in MODELS.items() if (reason := missing(modules, HINT)) is not None}


def unavailable_reason() -> str | None:
    missing_all = missing_models()
    return next(iter(missing_all.values())) if len(missing_all) == len(MODELS) else None


def _targets(batch: int) -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    return [{"labels": torch.randint(0, 80, (3,), generator=generator),
             "boxes": torch.rand(3, 2, generator=generator) * 0.5 + 0.25} for _ in range(batch)]


def _boxes(targets):
    return [torch.cat([t["boxes"], t["boxes"] * 0.4], 1) for t in targets]  # (cx, cy, w, h)


def ultralytics_model(size: int, batch: int):
    """(module, inference(images), training_step(images)) of ultralytics' RT-DETR-l."""
    from ultralytics.nn.tasks import RTDETRDetectionModel

    from rtdetrv2_kernels.integrations import ultralytics as integration

    model = RTDETRDetectionModel("rtdetr-l.yaml", nc=80, verbose=False)
    model.nc = model.yaml["nc"]
    targets = _targets(batch)
    labels = {"batch_idx": torch.cat([torch.full((3,), float(i)) for i in range(batch)]),
              "cls": torch.cat([t["labels"] for t in targets]).float()[:, None], "bboxes": torch.cat(_boxes(targets))}

    def inference(images):
        return model(images)[1][0]  # the decoder's boxes (before top-k, which near-ties may reorder)

    def training_step(images):
        model.loss({"img": images, **labels})[0].sum().backward()

    return integration, model, inference, training_step


def rfdetr_model(size: int, batch: int, variant: str):
    from rfdetr.config import RFDETRBaseConfig, RFDETRNanoConfig, TrainConfig
    from rfdetr.models import build_criterion_from_config, build_model_from_config

    from rtdetrv2_kernels.integrations import rfdetr as integration

    # base: its config's pretrain_weights string keeps build_model from fetching DINOv2 weights (None would).
    config = RFDETRNanoConfig(pretrain_weights=None, device="cpu") if variant == "nano" else RFDETRBaseConfig(device="cpu")
    train = TrainConfig(dataset_dir=".", output_dir=".")
    model = build_model_from_config(config, train)
    criterion, _ = build_criterion_from_config(config, train)
    targets = [{"labels": t["labels"], "boxes": b} for t, b in zip(_targets(batch), _boxes(_targets(batch)))]

    def inference(images):
        return model(images)["pred_boxes"]

    def training_step(images):
        losses = criterion(model(images, targets), targets)
        sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()

    return integration, model, inference, training_step


class _KernelsHub:
    """patched() for the transformers model: the model kernelized with the package's hub layer (a copy), or
    not. Inference and training use two modules of the same weights."""

    def __init__(self, plain, kernelized):
        self.plain, self.kernelized, self.active = plain, kernelized, False

    def patched(self):
        hub = self

        class Active:
            def __enter__(self):
                hub.active = True

            def __exit__(self, *exc):
                hub.active = False

        return Active()

    def model(self):
        return self.kernelized if self.active else self.plain


def transformers_model(size: int, batch: int):
    import transformers
    from kernels import Mode, kernelize, use_kernel_mapping

    from rtdetrv2_kernels.integrations import kernels_hub

    torch.manual_seed(0)
    plain = transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(
        backbone_config=transformers.RTDetrResNetConfig(depths=[2, 2, 2, 2], layer_type="basic",
                                                        hidden_sizes=[64, 128, 256, 512],
                                                        out_features=["stage2", "stage3", "stage4"]),
        encoder_in_channels=[128, 256, 512], use_pretrained_backbone=False, num_labels=80))
    kernelized = copy.deepcopy(plain)
    with use_kernel_mapping(kernels_hub.kernel_mapping(), inherit_mapping=False):
        kernelize(kernelized, mode=Mode.TRAINING, device="cpu")
    hub = _KernelsHub(plain, kernelized)
    both = torch.nn.ModuleList([plain, kernelized])  # train() / eval() reach both
    labels = [{"class_labels": t["labels"], "boxes": b} for t, b in zip(_targets(batch), _boxes(_targets(batch)))]

    def inference(images):
        return hub.model()(pixel_values=images).pred_boxes

    def training_step(images):
        hub.model()(pixel_values=images, labels=labels).loss.backward()

    return hub, both, inference, training_step


BUILDERS = {
    "ultralytics RT-DETR-l": ultralytics_model,
    "RF-DETR nano": lambda size, batch: rfdetr_model(size, batch, "nano"),
    "RF-DETR base": lambda size, batch: rfdetr_model(size, batch, "base"),
    "transformers RT-DETR (kernels hub)": transformers_model,
}
# RF-DETR's windowed backbones need sides divisible by patch size x windows (nano 16 x 2, base 14 x 4).
SIDES = {"RF-DETR nano": 32, "RF-DETR base": 56}


def _check(switch, inference, images, name: str) -> None:
    with torch.no_grad():
        expected = inference(images)
        with switch.patched():
            actual = inference(images)
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    if not error <= 1e-4:
        raise AssertionError(f"{name}: patched and unpatched outputs differ (relative {error:.2e})")


def time_codebases(rounds: int, budget_s: float, threads: int, quick: bool = False) -> list[dict]:
    _offline()
    settings = QUICK if quick else SETTINGS
    rows = []
    for name, build in BUILDERS.items():
        if name in missing_models():
            continue
        side = settings["image"] // SIDES.get(name, 32) * SIDES.get(name, 32)
        torch.manual_seed(0)
        switch, model, inference, training_step = build(side, settings["batch"])
        images = torch.rand(settings["batch"], 3, side, side, generator=torch.Generator().manual_seed(1))
        for mode in ("inference", "training step"):
            model.train(mode == "training step")
            if mode == "inference":
                _check(switch, inference, images, name)

            def unpatched():
                with torch.no_grad() if mode == "inference" else torch.enable_grad():
                    (inference if mode == "inference" else training_step)(images)

            def patched():
                with switch.patched():
                    unpatched()

            measured = timing.measure({"unpatched": unpatched, "patched": patched}, "cpu", rounds, budget_s, threads)
            row = {"model": name, "pass": mode, "image": side, "batch": settings["batch"]}
            timing.record(row, measured)
            row["speedup"] = row["unpatched ms"] / row["patched ms"]
            rows.append(row)
        del model
    return rows


def markdown(rows: list[dict]) -> str:
    return timing.comparison_table(
        TITLE,
        "Each codebase's detector as it is and patched onto this package's op (`rtdetrv2_kernels.integrations`; "
        "the transformers model kernelized with the package's `kernels` hub layer), random weights, float32 on "
        "the CPU: inference, and a training step (forward with targets, the codebase's own loss, backward). "
        "Outputs checked to agree first. Median ms (± interquartile range over the median); speedup is "
        "unpatched over patched.",
        rows, ["model", "pass", "image", "batch"], ["unpatched", "patched"], ["speedup"], digits=0)
