"""Training python_model on COCO-format data with the original recipe: AdamW with per-group learning rates
and weight decay (the paper's scale-adaptive hyperparameters, per preset), linear warm-up, gradient
clipping, an EMA of the weights, optional AMP, the dynamic augmentation and multi-scale batches of data.py,
a checkpoint per epoch in the original solver's format, and COCO evaluation after each epoch.

    python -m python_model train --data DIR --preset r18vd [--weights CKPT] --epochs N --batch-size B --out RUN
    train(TrainSettings(data="DIR", preset="r18vd", epochs=N, batch_size=B, out="RUN"))

DIR holds train/ and val/, each with its images and an instances.json, or COCO's own layout
(annotations/instances_train2017.json with train2017/, and the same for val2017).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch

from .checkpoints import CheckpointError, read_pretrained
from .config import RTDETRv2Config, preset
from .criterion import build_criterion
from .data import TRAIN_SCALES, CocoDetection, EvalTransforms, MultiScaleCollate, TrainTransforms
from .evaluate import evaluate, format_metrics
from .model import RTDETRv2
from .progress import Progress


@dataclass
class Recipe:
    """One preset's optimization settings (rtdetrv2_pytorch/configs/rtdetrv2/*.yml)."""

    lr: float = 1e-4
    backbone_lr: float = 1e-5  # the backbone's parameters outside its norms
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    no_decay: str = r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$"  # parameter names without weight decay
    epochs: int = 72
    stop_epoch: int = 71  # the strong augmentations and the multi-scale batches stop here
    warmup_steps: int = 2000
    clip_max_norm: float = 0.1
    ema_decay: float = 0.9999
    ema_warmups: int = 2000


RECIPES: dict[str, Recipe] = {
    "r18vd": Recipe(backbone_lr=1e-4, no_decay=r"^(?=.*(?:norm|bn)).*$", epochs=120, stop_epoch=117),
    "r34vd": Recipe(backbone_lr=5e-5, no_decay=r"^(?=.*(?:norm|bn)).*$", epochs=120, stop_epoch=117),
    "r50vd_m": Recipe(epochs=84, stop_epoch=81),
    "r50vd": Recipe(),
    "r101vd": Recipe(backbone_lr=1e-6),
}


def recipe_for(preset_name: str) -> Recipe:
    """A preset's recipe; the sp/dsp variants train as their base model."""
    base = re.sub(r"_(sp\d|dsp)$", "", preset_name)
    if base not in RECIPES:
        raise ValueError(f"no training recipe for preset {preset_name!r}; known: {sorted(RECIPES)}")
    return RECIPES[base]


@dataclass
class TrainSettings:
    data: str
    out: str
    preset: str = "r18vd"
    weights: str | None = None  # a checkpoint to start from (transformers directory/Hub id, or a .pth)
    resume: str | None = None  # a checkpoint of this trainer to continue
    epochs: int | None = None  # default: the recipe's
    batch_size: int = 16
    image_size: int = 640
    scales: tuple[int, ...] | None = None  # default: TRAIN_SCALES scaled by image_size / 640
    amp: str | None = None  # "bf16" or "fp16"
    device: str | None = None
    workers: int = 2
    evaluate_every_epoch: bool = True
    max_steps: int | None = None  # stop after this many optimizer steps (tests, time-bounded runs)
    progress: bool = True
    model_overrides: dict = field(default_factory=dict)  # RTDETRv2Config fields, e.g. a smaller model
    recipe_overrides: dict = field(default_factory=dict)  # Recipe fields


def find_split(root: str, split: str) -> tuple[str, str]:
    """(images directory, instances JSON) of a split in either supported layout."""
    simple = os.path.join(root, split)
    if os.path.isfile(os.path.join(simple, "instances.json")):
        return simple, os.path.join(simple, "instances.json")
    coco = os.path.join(root, "annotations", f"instances_{split}2017.json")
    if os.path.isfile(coco):
        return os.path.join(root, f"{split}2017"), coco
    raise FileNotFoundError(f"{root}: no {split} split (expected {simple}/instances.json or {coco})")


class ModelEMA:
    """The original's exponential moving average of the weights: decay * (1 - exp(-updates / warmups)), so
    that early updates follow the model closely."""

    def __init__(self, model: torch.nn.Module, decay: float, warmups: int):
        self.module = RTDETRv2(model.config)
        self.module.load_state_dict(model.state_dict())
        self.module.eval().requires_grad_(False)
        self.decay, self.warmups, self.updates = decay, warmups, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = self.decay * (1 - math.exp(-self.updates / self.warmups))
        state = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(state[name].detach(), 1 - decay)
            else:
                value.copy_(state[name])

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


def parameter_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict]:
    """AdamW groups as the original's regexes make them: the backbone (outside its norms) at backbone_lr,
    the no_decay pattern without weight decay, everything else at lr with weight decay."""
    backbone, no_decay, rest = [], [], []
    pattern = re.compile(recipe.no_decay)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if pattern.match(name):
            no_decay.append(parameter)
        elif name.startswith("backbone.") and "norm" not in name:
            backbone.append(parameter)
        else:
            rest.append(parameter)
    groups = [{"params": backbone, "lr": recipe.backbone_lr}, {"params": no_decay, "weight_decay": 0.0},
              {"params": rest}]
    return [g for g in groups if g["params"]]


def class_dependent(key: str) -> bool:
    return bool(re.search(r"(dec_score_head|enc_score_head|denoising_class_embed)\.", key))


def initial_model(settings: TrainSettings, config: RTDETRv2Config, log) -> RTDETRv2:
    """A new model of `config`, with the weights of settings.weights where given; class heads of another
    class count are left newly initialized (fine-tuning to other classes), and the log says so."""
    model = RTDETRv2(config)
    if not settings.weights:
        return model
    _, state = read_pretrained(settings.weights, settings.preset)
    own = model.state_dict()
    replaced = sorted(k for k in state if k in own and class_dependent(k) and state[k].shape != own[k].shape)
    if replaced:
        log(f"{settings.weights}: its class heads are for another number of classes; {len(replaced)} tensors "
            f"(class heads and the denoising class embedding) start newly initialized for {config.num_classes}")
    state = {k: v for k, v in state.items() if k not in replaced}
    missing = sorted(set(own) - set(state) - set(replaced))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{settings.weights} does not fit preset {settings.preset!r}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}")
    model.load_state_dict(state, strict=False)
    return model


def save_checkpoint(path: str, model, ema, optimizer, warmup, epoch: int, step: int) -> None:
    """The original solver's keys (model, ema {module, updates}, optimizer, lr_warmup_scheduler, last_epoch),
    plus this model's configuration so that loading needs no preset."""
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_warmup_scheduler": warmup.state_dict(), "last_epoch": epoch, "step": step,
                "config": model.config.to_dict()}, path + ".tmp")
    os.replace(path + ".tmp", path)  # a run killed while saving keeps the previous checkpoint


def train(settings: TrainSettings, log=print) -> dict:
    """Trains; returns {"epochs": per-epoch records (loss, time, metrics), "checkpoint": the last path}."""
    recipe = dataclasses.replace(recipe_for(settings.preset), **settings.recipe_overrides)
    epochs = settings.epochs or recipe.epochs
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = (settings.image_size, settings.image_size)
    scales = settings.scales or tuple(int(round(s * settings.image_size / 640 / 32)) * 32 for s in TRAIN_SCALES)
    train_dir, train_json = find_split(settings.data, "train")
    train_set = CocoDetection(train_dir, train_json, TrainTransforms(size, recipe.stop_epoch))
    val_set = None
    if settings.evaluate_every_epoch:
        val_set = CocoDetection(*find_split(settings.data, "val"), EvalTransforms(size))
    config = preset(settings.preset, num_classes=len(train_set.class_names), labels=train_set.class_names,
                    eval_spatial_size=list(size), **settings.model_overrides)
    model = initial_model(settings, config, log).to(device).train()
    criterion = build_criterion(config)
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe), lr=recipe.lr, betas=recipe.betas,
                                  weight_decay=recipe.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / recipe.warmup_steps))
    ema = ModelEMA(model, recipe.ema_decay, recipe.ema_warmups)
    amp_dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[settings.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
    start_epoch, step = 0, 0
    if settings.resume:
        checkpoint = torch.load(settings.resume, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        warmup.load_state_dict(checkpoint["lr_warmup_scheduler"])
        start_epoch, step = checkpoint["last_epoch"] + 1, checkpoint["step"]
        log(f"resuming {settings.resume} at epoch {start_epoch}")
    collate = MultiScaleCollate(scales, recipe.stop_epoch)
    loader = torch.utils.data.DataLoader(train_set, batch_size=settings.batch_size, shuffle=True, drop_last=True,
                                         num_workers=settings.workers, collate_fn=collate)
    if len(loader) == 0:
        raise ValueError(f"{train_json}: {len(train_set)} images make no full batch of {settings.batch_size}")
    os.makedirs(settings.out, exist_ok=True)
    history, path = [], None
    for epoch in range(start_epoch, epochs):
        train_set.set_epoch(epoch)
        collate.set_epoch(epoch)
        started, total = time.perf_counter(), 0.0
        with Progress(len(loader), f"epoch {epoch}", enabled=settings.progress) as bar:
            for images, targets in loader:
                images = images.to(device)
                targets = [{"labels": t["labels"].to(device), "boxes": t["boxes"].to(device)} for t in targets]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = model(images, targets)
                losses = criterion(outputs, targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses["loss"]).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_max_norm)
                scaler.step(optimizer)
                scaler.update()
                warmup.step()
                ema.update(model)
                step += 1
                total += losses["loss"].item()
                bar.step(images.shape[0], loss=losses["loss"].item(), lr=optimizer.param_groups[-1]["lr"])
                if settings.max_steps is not None and step >= settings.max_steps:
                    break
        record = {"epoch": epoch, "steps": step, "loss": total / max(bar.done, 1),
                  "seconds": time.perf_counter() - started}
        path = os.path.join(settings.out, "last.pth")
        save_checkpoint(path, model, ema, optimizer, warmup, epoch, step)
        if val_set is not None:
            record["metrics"] = evaluate(ema.module, val_set, settings.batch_size, device, settings.progress)
            log(f"epoch {epoch}: loss {record['loss']:.4f}  EMA on val: {format_metrics(record['metrics'])}")
        else:
            log(f"epoch {epoch}: loss {record['loss']:.4f}")
        history.append(record)
        with open(os.path.join(settings.out, "log.jsonl"), "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if settings.max_steps is not None and step >= settings.max_steps:
            break
    return {"epochs": history, "checkpoint": path}
