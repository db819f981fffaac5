"""Where and how a network runs: the device, mixed precision, memory layout and budget.

Shared by training, evaluation and normal-only fitting, the stages that come after models.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext

import torch

from inspect3d.errors import InspectError

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
