"""A whole training step of the detector (forward with targets, criterion, backward, AdamW step):
python_model on this package's kernels against transformers' RTDetrV2ForObjectDetection, eager and with
rtdetrv2_kernels.integrations.transformers patched in, the same weights and batch, in interleaved rounds."""

from __future__ import annotations

import torch

from . import timing
from .model import build_pair
from .requirements import missing

TITLE = "Training step"
# CPU: a small batch in float32; GPU: the published training batch, bf16 autocast.
SETTINGS = {"cpu": [(2, 640, None)], "cuda": [(16, 640, torch.bfloat16)]}
QUICK = {"cpu": [(1, 256, None)], "cuda": [(4, 320, torch.bfloat16)]}
PRESET = "r18vd"


def unavailable_reason() -> str | None:
    """Why the section cannot run here, or None: both models' matchers use scipy's linear_sum_assignment."""
    return missing(["transformers", "scipy"])


def make_targets(batch: int, device: str) -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    targets = []
    for _ in range(batch):
        count = int(torch.randint(3, 12, (), generator=generator))
        size = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        center = size / 2 + torch.rand(count, 2, generator=generator) * (1 - size)
        targets.append({"class_labels": torch.randint(0, 80, (count,), generator=generator).to(device),
                        "boxes": torch.cat([center, size], 1).to(device)})
    return targets


def step_functions(ours, theirs, images, targets, device: str, amp):
    """name -> a function running one training step (lr 0: the weights stay as they are)."""
    from python_model import build_criterion
    from rtdetrv2_kernels.integrations.transformers import patched

    criterion = build_criterion(ours.config)
    optimizers = {id(m): torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.0)
                  for m in (ours, theirs)}

    def autocast():
        return torch.autocast(device, dtype=amp, enabled=amp is not None)

    def ours_step():
        optimizer = optimizers[id(ours)]
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            outputs = ours(images, targets)
        criterion(outputs, targets)["loss"].backward()
        optimizer.step()

    def theirs_step():
        optimizer = optimizers[id(theirs)]
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = theirs(pixel_values=images, labels=targets).loss
        loss.backward()
        optimizer.step()

    def theirs_patched_step():
        with patched():
            theirs_step()

    return {"python_model": ours_step, "transformers": theirs_step, "transformers patched": theirs_patched_step}


def check_patched_loss(theirs, images, targets, device, amp) -> None:
    """transformers' loss with and without the patch, from the same denoising noise."""
    from rtdetrv2_kernels.integrations.transformers import patched

    losses = []
    for patch in (False, True):
        torch.manual_seed(5)
        with torch.no_grad(), torch.autocast(device, dtype=amp, enabled=amp is not None):
            if patch:
                with patched():
                    losses.append(theirs(pixel_values=images, labels=targets).loss.float().item())
            else:
                losses.append(theirs(pixel_values=images, labels=targets).loss.float().item())
    tolerance = 1e-4 if amp is None else 3e-2
    if not abs(losses[1] - losses[0]) <= tolerance * abs(losses[0]):
        raise AssertionError(f"transformers' loss changes with the patch: {losses[0]} vs {losses[1]}")


def time_training(device: str, rounds: int, budget_s: float, threads: int, quick: bool = False) -> list[dict]:
    rows = []
    for batch, size, amp in (QUICK if quick else SETTINGS)[device]:
        theirs, ours = build_pair(PRESET, device, torch.float32)
        theirs.train()
        ours.train()
        images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
        targets = make_targets(batch, device)  # transformers' keys, which python_model also reads
        check_patched_loss(theirs, images, targets, device, amp)
        steps = step_functions(ours, theirs, images, targets, device, amp)
        measured = timing.measure(steps, device, rounds, budget_s, threads)
        row = {"model": PRESET, "device": device, "amp": "none" if amp is None else str(amp).replace("torch.", ""),
               "batch": batch, "image": size}
        timing.record(row, measured)
        row["speedup"] = row["transformers ms"] / row["python_model ms"]
        row["speedup patched"] = row["transformers ms"] / row["transformers patched ms"]
        rows.append(row)
        del theirs, ours
    return rows


def markdown(rows: list[dict]) -> str:
    return timing.comparison_table(
        TITLE,
        "One training step of the whole detector (forward with targets and contrastive denoising, the matching "
        "criterion, backward, AdamW step), same weights and batch: python_model on this package's kernels, "
        "transformers' RTDetrV2ForObjectDetection as it is, and transformers with "
        "`rtdetrv2_kernels.integrations.transformers` patched in. Median ms per step (± interquartile range over "
        "the median); speedups are transformers' time over the other's.",
        rows, ["model", "device", "amp", "batch", "image"], ["python_model", "transformers", "transformers patched"],
        ["speedup", "speedup patched"], digits=0)
