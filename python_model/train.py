"""Training python_model on COCO-format data with the original recipe: AdamW with per-group learning rates
and weight decay (the paper's scale-adaptive hyperparameters, per preset), linear warm-up, gradient
clipping, an EMA of the weights, optional AMP, the dynamic augmentation and multi-scale batches of data.py,
a checkpoint per epoch in the original solver's format, and COCO evaluation after each epoch.

    python -m python_model train --data DIR --preset r18vd [--weights CKPT] --epochs N --batch-size B --out RUN
    train(TrainSettings(data="DIR", preset="r18vd", epochs=N, batch_size=B, out="RUN"))

DIR holds train/ and val/, each with its images and an instances.json; or COCO's own layout
(annotations/instances_train2017.json with train2017/, and the same for val2017); or Roboflow's COCO export
(train/ and valid/, each with its images and a _annotations.coco.json). Instead of DIR, or for one split,
the files can be named: TrainSettings.train_annotations with train_images, val_annotations with val_images.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field

import torch

from .checkpoints import CheckpointError, read_pretrained
from .config import RTDETRv2Config, preset
from .criterion import build_criterion
from .data import TRAIN_SCALES, CocoDetection, EvalTransforms, MultiScaleCollate, TrainTransforms
from .evaluate import evaluate, format_metrics
from .layers import ConvNormLayer, FrozenBatchNorm2d
from .model import RTDETRv2
from .progress import Progress


# The original's AdamW groups (configs/rtdetrv2/*.yml): a parameter takes the settings of the first pattern its
# name matches (lr and weight decay unset there: the recipe's), the rest takes the recipe's.
_NORMS_NO_DECAY = (r"^(?=.*(?:norm|bn)).*$", {"weight_decay": 0.0})
_HEAD_NORMS_NO_DECAY = (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", {"weight_decay": 0.0})


@dataclass
class Recipe:
    """One preset's training settings, as the original's configuration resolves them."""

    groups: tuple = ()  # (name pattern, AdamW settings) pairs, first match wins
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 72
    stop_epoch: int = 71  # from this epoch on: no photometric distortion, zoom-out, IoU crop, multi-scale
    multiscale: bool = True  # batches resized to a random TRAIN_SCALES side (r18vd trains at one size)
    freeze_stem: bool = False  # the backbone's three stem convolutions do not train (ResNet-50/101: freeze_at 0)
    train_backbone_norms: bool = False  # ResNet-18/34 train their backbone's BatchNorm (freeze_norm: False)
    warmup_steps: int = 2000
    clip_max_norm: float = 0.1
    ema_decay: float = 0.9999
    ema_warmups: int = 2000


RECIPES: dict[str, Recipe] = {
    "r18vd": Recipe(groups=(_NORMS_NO_DECAY,), epochs=120, stop_epoch=117, multiscale=False,
                    train_backbone_norms=True),
    "r34vd": Recipe(groups=((r"^(?=.*backbone)(?!.*norm|bn).*$", {"lr": 5e-5}),
                            (r"^(?=.*backbone)(?=.*norm|bn).*$", {"lr": 5e-5, "weight_decay": 0.0}),
                            (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$", {"weight_decay": 0.0})),
                    epochs=120, stop_epoch=117, train_backbone_norms=True),
    "r50vd_m": Recipe(groups=((r"^(?=.*backbone)(?!.*norm).*$", {"lr": 1e-5}), _HEAD_NORMS_NO_DECAY),
                      epochs=84, stop_epoch=81, freeze_stem=True),
    "r50vd": Recipe(groups=((r"^(?=.*backbone)(?!.*norm).*$", {"lr": 1e-5}), _HEAD_NORMS_NO_DECAY), freeze_stem=True),
    "r101vd": Recipe(groups=((r"^(?=.*backbone)(?!.*norm|bn).*$", {"lr": 1e-6}), _HEAD_NORMS_NO_DECAY),
                     freeze_stem=True),
}
# The discrete-sampling models are fine-tuned from their bilinear counterparts, briefly.
_DSP_SCHEDULE = {"r18vd": (36, 33), "r34vd": (12, 10), "r50vd_m": (36, 33), "r50vd": (12, 10)}


def recipe_for(preset_name: str) -> Recipe:
    """A preset's recipe: sp variants train as r18vd; dsp variants as their base, on a short schedule."""
    base = re.sub(r"_(sp\d|dsp)$", "", preset_name)
    if base not in RECIPES:
        raise ValueError(f"no training recipe for preset {preset_name!r}; known: {sorted(RECIPES)}")
    recipe = RECIPES[base]
    if preset_name.endswith("_dsp"):
        epochs, stop = _DSP_SCHEDULE[base]
        recipe = dataclasses.replace(recipe, epochs=epochs, stop_epoch=stop)
    return recipe


@dataclass
class TrainSettings:
    out: str
    data: str | None = None  # a dataset directory in one of find_split's layouts
    # A split's files named explicitly (both or neither), instead of finding them under data:
    train_annotations: str | None = None
    train_images: str | None = None
    val_annotations: str | None = None
    val_images: str | None = None
    preset: str = "r18vd"
    weights: str | None = None  # a checkpoint to start from (transformers directory/Hub id, or a .pth)
    resume: str | None = None  # a checkpoint of this trainer to continue
    epochs: int | None = None  # default: the recipe's
    batch_size: int = 16
    image_size: int = 640
    scales: tuple[int, ...] | None = None  # default: the recipe's (TRAIN_SCALES scaled by image_size / 640, or none)
    amp: str | None = None  # "bf16" or "fp16"
    device: str | None = None
    workers: int = 2
    evaluate_every_epoch: bool = True
    max_steps: int | None = None  # stop after this many optimizer steps (tests, time-bounded runs)
    progress: bool = True
    model_overrides: dict = field(default_factory=dict)  # RTDETRv2Config fields, e.g. a smaller model
    recipe_overrides: dict = field(default_factory=dict)  # Recipe fields


def find_split(root: str, split: str) -> tuple[str, str]:
    """(images directory, instances JSON) of a split in any supported layout: <split>/instances.json, COCO's
    annotations/instances_<split>2017.json with <split>2017/, or Roboflow's COCO export
    <split>/_annotations.coco.json (whose validation split is named valid)."""
    simple = os.path.join(root, split, "instances.json")
    coco = os.path.join(root, "annotations", f"instances_{split}2017.json")
    coco_images = os.path.join(root, f"{split}2017")
    roboflow_images = os.path.join(root, "valid" if split == "val" else split)
    roboflow = os.path.join(roboflow_images, "_annotations.coco.json")
    for images, annotations in ((os.path.dirname(simple), simple), (coco_images, coco), (roboflow_images, roboflow)):
        if os.path.isfile(annotations):
            return images, annotations
    raise FileNotFoundError(f"{root}: no {split} split; looked for {simple} (images beside it), {coco} (images in "
                            f"{coco_images}), and Roboflow's {roboflow} (images beside it)")


def split_files(settings: TrainSettings, split: str) -> tuple[str, str]:
    """(images directory, instances JSON) of the train or val split: the settings' explicit pair where given,
    else found under settings.data."""
    images, annotations = getattr(settings, f"{split}_images"), getattr(settings, f"{split}_annotations")
    if bool(images) != bool(annotations):
        raise ValueError(f"{split}_annotations and {split}_images go together: give both or neither")
    if annotations:
        return images, annotations
    if not settings.data:
        raise ValueError(f"no {split} data: give data (a dataset directory) or {split}_annotations with "
                         f"{split}_images")
    return find_split(settings.data, split)


class ModelEMA:
    """The original's exponential moving average of the weights: decay * (1 - exp(-updates / warmups)), so
    that early updates follow the model closely. It follows the tensors `model` has when the EMA is made
    (loading state dicts into either side later copies in place and keeps them)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmups: int):
        # Frozen backbone norms, as inference and checkpoints hold them; on the model's device.
        self.module = RTDETRv2(model.config).to(next(model.parameters()).device)
        state = model.state_dict(keep_vars=True)
        self.module.load_state_dict({name: state[name] for name in self.module.state_dict()})
        self.module.eval().requires_grad_(False)
        self.decay, self.warmups, self.updates = decay, warmups, 0
        # Paired once rather than per step: parameters and float buffers, by name; counters (BatchNorm's
        # num_batches_tracked) keep their first value. keep_vars: the tensors themselves, not views of them.
        averaged = {name: value for name, value in self.module.state_dict(keep_vars=True).items()
                    if value.dtype.is_floating_point}
        self._averaged = list(averaged.values())
        self._followed = [state[name] for name in averaged]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = self.decay * (1 - math.exp(-self.updates / self.warmups))
        torch._foreach_lerp_(self._averaged, self._followed, 1 - decay)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


def parameter_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict]:
    """AdamW parameter groups: each parameter in the first of recipe.groups whose pattern its name matches,
    the rest in a group of the recipe's own settings."""
    patterns = [(re.compile(pattern), settings) for pattern, settings in recipe.groups]
    members = [[] for _ in range(len(patterns) + 1)]
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            index = next((i for i, (pattern, _) in enumerate(patterns) if pattern.match(name)), len(patterns))
            members[index].append(parameter)
    groups = [{"params": params, **settings} for params, (_, settings) in zip(members, patterns)]
    groups.append({"params": members[-1]})
    return [g for g in groups if g["params"]]


def unfreeze_backbone_norms(model: RTDETRv2) -> None:
    """Replaces the backbone's frozen norms by BatchNorm2d with the same statistics and affine map, which
    then train (and track batch statistics) as the original's ResNet-18/34 do. Checkpoints gain the norms'
    num_batches_tracked counters, which loading drops again (checkpoints.py)."""
    for module in model.backbone.modules():
        if isinstance(module, ConvNormLayer) and isinstance(module.norm, FrozenBatchNorm2d):
            frozen = module.norm
            norm = torch.nn.BatchNorm2d(frozen.weight.numel(), eps=frozen.eps).to(frozen.weight.device)
            norm.train(frozen.training)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(norm, name).copy_(getattr(frozen, name))
            module.norm = norm


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


def save_checkpoint(path: str, model, ema, optimizer, warmup, scaler, epoch: int, step: int, best_ap: float) -> None:
    """The original solver's keys (date, last_epoch, model, ema {module, updates}, optimizer,
    lr_warmup_scheduler, scaler with fp16), plus the step, the best AP of the run so far (-1 before any
    evaluation; resuming keeps it) and this model's configuration, so that loading needs no preset."""
    checkpoint = {"date": datetime.datetime.now().isoformat(), "last_epoch": epoch, "model": model.state_dict(),
                  "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                  "lr_warmup_scheduler": warmup.state_dict(), "step": step, "best_ap": best_ap,
                  "config": model.config.to_dict()}
    if scaler.is_enabled():
        checkpoint["scaler"] = scaler.state_dict()
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)  # a run killed while saving keeps the previous checkpoint


def train(settings: TrainSettings, log=print) -> dict:
    """Trains; returns {"epochs": per-epoch records (loss, time, metrics), "checkpoint": last.pth's path}.
    The run directory gets last.pth after every epoch, best.pth whenever the EMA's AP improves on the best
    of the run (a resumed run's included), and log.jsonl (one record per epoch)."""
    recipe = dataclasses.replace(recipe_for(settings.preset), **settings.recipe_overrides)
    epochs = settings.epochs or recipe.epochs
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = (settings.image_size, settings.image_size)
    scales = settings.scales
    if scales is None and recipe.multiscale:
        scales = tuple(max(32, int(round(s * settings.image_size / 640 / 32)) * 32) for s in TRAIN_SCALES)
    train_dir, train_json = split_files(settings, "train")
    train_set = CocoDetection(train_dir, train_json, TrainTransforms(size, recipe.stop_epoch))
    val_set = None
    if settings.evaluate_every_epoch:
        val_set = CocoDetection(*split_files(settings, "val"), EvalTransforms(size))
    config = preset(settings.preset, num_classes=len(train_set.class_names), labels=train_set.class_names,
                    eval_spatial_size=list(size), **settings.model_overrides)
    model = initial_model(settings, config, log).to(device).train()
    if recipe.train_backbone_norms:
        unfreeze_backbone_norms(model)
    if recipe.freeze_stem:
        model.backbone.conv1.requires_grad_(False)
    criterion = build_criterion(config)
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe), lr=recipe.lr, betas=recipe.betas,
                                  weight_decay=recipe.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / recipe.warmup_steps))
    ema = ModelEMA(model, recipe.ema_decay, recipe.ema_warmups)
    amp_dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[settings.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
    start_epoch, step, best = 0, 0, -1.0
    if settings.resume:
        checkpoint = torch.load(settings.resume, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        warmup.load_state_dict(checkpoint["lr_warmup_scheduler"])
        if "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, step = checkpoint["last_epoch"] + 1, checkpoint["step"]
        best = checkpoint.get("best_ap", -1.0)  # checkpoints of earlier versions: unknown
        log(f"resuming {settings.resume} at epoch {start_epoch}")
    collate = MultiScaleCollate(scales or (), recipe.stop_epoch)
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
                with warnings.catch_warnings():
                    # fp16: the scaler skips the steps whose gradients overflowed (the first ones, while it
                    # finds its scale); the warm-up counts steps regardless, as the original's does.
                    warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                    warmup.step()
                ema.update(model)
                step += 1
                loss = losses["loss"].item()  # read once: each read waits for the device
                total += loss
                bar.step(images.shape[0], loss=loss, lr=optimizer.param_groups[-1]["lr"])
                if settings.max_steps is not None and step >= settings.max_steps:
                    break
        record = {"epoch": epoch, "steps": step, "loss": total / max(bar.done, 1),
                  "seconds": time.perf_counter() - started}
        path = os.path.join(settings.out, "last.pth")
        # Saved before evaluating, so that a failed evaluation does not lose the epoch.
        save_checkpoint(path, model, ema, optimizer, warmup, scaler, epoch, step, best)
        if val_set is not None:
            record["metrics"] = evaluate(ema.module, val_set, settings.batch_size, device, settings.progress)
            log(f"epoch {epoch}: loss {record['loss']:.4f}  EMA on val: {format_metrics(record['metrics'])}")
            if record["metrics"]["AP"] > best:
                best = record["metrics"]["AP"]
                # Saved again with the new best, so that resuming from last.pth or best.pth knows it.
                save_checkpoint(path, model, ema, optimizer, warmup, scaler, epoch, step, best)
                shutil.copyfile(path, os.path.join(settings.out, "best.pth"))
        else:
            log(f"epoch {epoch}: loss {record['loss']:.4f}")
        history.append(record)
        with open(os.path.join(settings.out, "log.jsonl"), "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if settings.max_steps is not None and step >= settings.max_steps:
            break
    return {"epochs": history, "checkpoint": path}
