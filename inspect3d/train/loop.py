"""One epoch of training, and prediction over a data set (torchvision-reference style)."""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from inspect3d.errors import InspectError
from inspect3d.train.augment import AugmentSettings, augment

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA device that is missing is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InspectError(
            f"trainer.device={name!r} but no CUDA device is available: use auto or cpu"
        )
    if name != "cpu" and not name.startswith("cuda"):
        raise InspectError(f"trainer.device={name!r} is not valid: use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on CUDA (bf16 where supported, else fp16); plain fp32 on CPU."""
    if device.type != "cuda" or not enabled:
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


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


def train_one_epoch(
    model: nn.Module,
    loader,
    criterion,
    optimizer,
    scheduler,
    scaler,
    device: torch.device,
    aug: AugmentSettings | None,
    gen: torch.Generator,
    amp: bool,
    grad_clip: float,
    max_steps: int | None,
    progress: bool,
    desc: str,
    map_weight: float = 0.0,
    times: StepTimes | None = None,
) -> float:
    """Train for one pass over ``loader``; return the mean loss. ``times`` (if given) receives
    each step's data-wait, preparation and total time."""
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    batches = iter(bar)
    step = 0
    while max_steps is None or step < max_steps:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        fetched = time.perf_counter()
        x, y, mask, known = _prepare(batch, device, aug, gen)
        prepared = time.perf_counter()
        with autocast(device, amp):
            logits, logit_map = model(x)
        loss = criterion(logits.float(), y)
        if map_weight > 0 and bool(known.any()):
            cells = cell_targets(mask, y, known.to(device), logit_map.shape[-2:])
            loss = loss + map_weight * criterion(logit_map.float(), cells)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}: lower optim.lr")
        _backward(loss, model, optimizer, scheduler, scaler, grad_clip)
        total, count = total + loss.item() * len(y), count + len(y)  # .item() waits for device
        if times is not None:
            end = time.perf_counter()
            times.add(fetched - start, prepared - fetched, end - start, len(y))
        bar.set_postfix(loss=f"{total / count:.4f}")
        step += 1
    return total / max(count, 1)


def _prepare(batch, device: torch.device, aug: AugmentSettings | None, gen: torch.Generator):
    """Copy a batch to the device as uint8 (4x fewer bytes than float) and augment it there;
    ``known`` stays on the host, where testing it costs no device synchronisation."""
    x, y, mask, known = batch
    x = x.to(device, non_blocking=True)
    mask = mask.to(device, non_blocking=True)
    if aug is None:  # features computed once (a probe): nothing to augment
        x = x.float()
    else:
        x, mask = augment(x, mask, aug, gen)
    x = to_memory_format(x)
    return x, y.to(device, non_blocking=True), mask, known


def _backward(loss, model, optimizer, scheduler, scaler, grad_clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # under DDP, gradients are averaged over ranks here
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def cell_targets(
    mask: torch.Tensor, labels: torch.Tensor, known: torch.Tensor, size: torch.Size
) -> torch.Tensor:
    """Class per defect-map cell: the layer's class where its mask touches the cell, else normal
    (index 0); -100 (ignored) for layers whose mask is unknown."""
    hit = torch.nn.functional.adaptive_max_pool2d(mask.float(), tuple(size))[:, 0] > 0
    cells = torch.where(hit, labels[:, None, None], torch.zeros_like(labels)[:, None, None])
    cells[~known] = -100
    return cells


BYTES_PER_INPUT_PIXEL = 400  # peak inference memory per input pixel (Lite0 features ~250)


def batch_for_memory(pre, wanted: int, memory_gb: float | None = None) -> int:
    """``wanted`` layers per batch, fewer where a batch's inference would not fit the memory
    budget (``memory_gb``, else a quarter of the memory available now)."""
    budget = memory_gb * 2**30 if memory_gb else _available_bytes() / 4
    fits = max(1, int(budget // (BYTES_PER_INPUT_PIXEL * pre.height * pre.width * pre.channels)))
    if fits < wanted:
        log.info(
            "batches of %d layers (not %d) to stay within %.1f GB", fits, wanted, budget / 2**30
        )
    return min(wanted, fits)


def _available_bytes() -> float:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * 2**30


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (None where unknown: Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA, where it is measured to help (tensor cores); contiguous on CPU.

    On CPUs with AVX-512, torch 2.14.1's oneDNN backward of a narrow channels_last
    convolution (SmallCNN width 4-8 at 128 px, batch 4) crashes the process with SIGSEGV;
    contiguous tensors take another kernel and pass (tests/test_models.py runs the case)."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def to_memory_format(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=memory_format(x.device))


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
