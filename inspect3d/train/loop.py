"""One epoch of training, and prediction over a data set (torchvision-reference style)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from inspect3d.models.device import autocast, to_memory_format
from inspect3d.train.augment import AugmentSettings, augment


@dataclass
class StepTimes:
    """Where one epoch's step time went, per step: blocked waiting for the next batch from the
    loader (``data``), augmenting and copying it to the device (``prep``), and the whole step.

    ``loss.item()`` at the end of every step already waits for the device, so the step and
    data-wait clocks measure real time on CUDA too; no extra synchronisation is added. (On CUDA,
    ``prep`` is only the host's share: the augmentation kernels run within the step.)
    """

    data: list[float] = field(default_factory=list)
    prep: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)
    images: list[int] = field(default_factory=list)

    def add(self, data: float, prep: float, step: float, images: int) -> None:
        self.data.append(data)
        self.prep.append(prep)
        self.step.append(step)
        self.images.append(images)

    def summary(self, warmup: int = 1) -> dict[str, float]:
        """Shares of step time and images/s over the steps after ``warmup`` (the first fetch
        starts the loader's worker processes); all steps if there are no more."""
        k = warmup if len(self.step) > warmup else 0
        step = sum(self.step[k:]) or float("nan")
        return {
            "data_wait": sum(self.data[k:]) / step,
            "prep": sum(self.prep[k:]) / step,
            "images_per_s": sum(self.images[k:]) / step,
            "step_ms": 1e3 * float(np.median(self.step[k:])) if self.step else float("nan"),
            "images": float(sum(self.images)),
        }


@dataclass
class Optimisation:
    """What a training step updates: the network (as trained: DDP-wrapped, or a probe's head),
    its loss, the optimiser with its learning-rate schedule, and the mixed-precision scaler."""

    net: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler


@dataclass(frozen=True)
class EpochSpec:
    """How an epoch runs: where, with which augmentation (None: features computed once, a
    probe), mixed precision, gradient clipping, at most ``max_steps`` steps, a progress bar
    titled ``desc``, and the weight of the defect-map loss."""

    device: torch.device
    aug: AugmentSettings | None
    amp: bool = False
    grad_clip: float = 1.0
    max_steps: int | None = None
    progress: bool = False
    desc: str = "train"
    map_weight: float = 0.0

    @classmethod
    def of_trainer(
        cls, trainer: Any, device: torch.device, aug: AugmentSettings | None, map_weight: float
    ) -> EpochSpec:
        """The settings of a ``configs/trainer`` node; mixed precision on CUDA only."""
        return cls(
            device=device,
            aug=aug,
            amp=bool(trainer.amp) and device.type == "cuda",
            grad_clip=trainer.grad_clip,
            max_steps=trainer.max_steps_per_epoch,
            progress=bool(trainer.progress),
            map_weight=map_weight,
        )


def train_one_epoch(
    state: Optimisation,
    loader,
    spec: EpochSpec,
    gen: torch.Generator,
    times: StepTimes | None = None,
) -> float:
    """Train for one pass over ``loader`` (at most ``spec.max_steps`` steps); return the mean
    loss. ``times`` (if given) receives each step's data-wait, preparation and total time."""
    state.net.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=spec.desc, disable=not spec.progress, leave=False)
    batches = iter(bar)
    step = 0
    while spec.max_steps is None or step < spec.max_steps:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        fetched = time.perf_counter()
        x, y, mask, known = _prepare(batch, spec.device, spec.aug, gen)
        prepared = time.perf_counter()
        loss = _loss(state, spec, (x, y, mask, known))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}: lower optim.lr")
        _backward(loss, state, spec.grad_clip)
        total, count = total + loss.item() * len(y), count + len(y)  # .item() waits for device
        if times is not None:
            end = time.perf_counter()
            times.add(fetched - start, prepared - fetched, end - start, len(y))
        bar.set_postfix(loss=f"{total / count:.4f}")
        step += 1
    return total / max(count, 1)


def _loss(state: Optimisation, spec: EpochSpec, batch) -> torch.Tensor:
    """Layer loss, plus the defect-map loss on the cells of layers whose mask is known."""
    x, y, mask, known = batch
    with autocast(spec.device, spec.amp):
        logits, logit_map = state.net(x)
    loss = state.criterion(logits.float(), y)
    if spec.map_weight > 0 and bool(known.any()):
        cells = cell_targets(mask, y, known.to(spec.device), logit_map.shape[-2:])
        loss = loss + spec.map_weight * state.criterion(logit_map.float(), cells)
    return loss


def _prepare(batch, device: torch.device, aug: AugmentSettings | None, gen: torch.Generator):
    """Copy a batch to the device as uint8 (4x fewer bytes than float) and augment it there;
    ``known`` stays on the host, where testing it costs no device synchronisation."""
    x, y, mask, known = batch
    x = x.to(device, non_blocking=True)
    mask = mask.to(device, non_blocking=True)
    if aug is None:  # features computed once (a probe): nothing to augment
        x = x.float()
    else:
        x, mask = augment(x, mask, aug, gen, y)
    x = to_memory_format(x)
    return x, y.to(device, non_blocking=True), mask, known


def _backward(loss: torch.Tensor, state: Optimisation, grad_clip: float) -> None:
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()  # under DDP, gradients are averaged over ranks here
    state.scaler.unscale_(state.optimizer)
    nn.utils.clip_grad_norm_(state.net.parameters(), grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()


def cell_targets(
    mask: torch.Tensor, labels: torch.Tensor, known: torch.Tensor, size: torch.Size
) -> torch.Tensor:
    """Class per defect-map cell: the layer's class where its mask touches the cell, else normal
    (index 0); -100 (ignored) for layers whose mask is unknown."""
    hit = torch.nn.functional.adaptive_max_pool2d(mask.float(), tuple(size))[:, 0] > 0
    cells = torch.where(hit, labels[:, None, None], torch.zeros_like(labels)[:, None, None])
    cells[~known] = -100
    return cells


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return to_memory_format(x.to(device, non_blocking=True))


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader,
    device: torch.device,
    amp: bool = False,
    progress: bool = False,
    desc: str = "predict",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class probabilities (N, K), labels (N,) and the logits (N, K) for every batch."""
    model.eval()
    probs, labels, logits = [], [], []
    for x, y, *_ in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with autocast(device, amp):
            out = model(_to_device(x, device))[0].float()
        logits.append(out.cpu())
        probs.append(torch.softmax(out, dim=1).cpu())
        labels.append(y)
    cat = lambda t: torch.cat(t).numpy()  # noqa: E731
    return cat(probs), cat(labels), cat(logits)
