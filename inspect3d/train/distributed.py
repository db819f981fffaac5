"""Data-parallel training (DDP) under ``torchrun``: one process per GPU, or CPU processes on gloo.

``torchrun --nproc_per_node=N -m inspect3d.cli train ...`` starts N copies of the same command.
Each composes the same Hydra config, reads its rank from torchrun's environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``) and joins one process group: NCCL on CUDA (device ``cuda:LOCAL_RANK``),
gloo on CPU. A SLURM job started by the submitit launcher with several tasks is joined the same
way (submitit's environment is translated into torchrun's).

Every rank trains on its own shard of the training layers (``DistributedSampler``) and DDP
averages the gradients, so the weights stay identical; rank 0 alone validates, writes files and
logs. With one process (no torchrun) every helper here is a no-op, so the single-process path
is exactly the one it always was.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from inspect3d.errors import InspectError
from inspect3d.models.device import resolve_device

log = logging.getLogger(__name__)

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True in the one process that validates, writes files and logs (rank 0, or no DDP)."""
    return rank() == 0


def env_ranks() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's environment; (1, 0, 0) outside torchrun."""
    _export_submitit_env()
    if "WORLD_SIZE" not in os.environ:
        return 1, 0, 0
    try:
        size, rank_, local = (int(os.environ.get(k, "0")) for k in ENV)
    except ValueError as exc:
        found = {k: os.environ.get(k) for k in ENV}
        raise InspectError(f"torchrun's environment is not valid: {found} ({exc})") from exc
    if not 0 <= rank_ < size:
        raise InspectError(f"RANK={rank_} is outside WORLD_SIZE={size}: start with torchrun")
    return size, rank_, local


def _export_submitit_env() -> None:
    """Inside a submitit job with several tasks (``hydra/launcher=slurm`` with
    ``tasks_per_node`` > 1) set torchrun's variables from SLURM's, so one code path serves both."""
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env.world_size > 1:
        env.export(set_cuda_visible_devices=False)  # we pick cuda:LOCAL_RANK ourselves


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is asked for (or ``auto`` finds
    it), else the CPU. One GPU per process is what DDP expects."""
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise InspectError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s): "
            "start torchrun with --nproc_per_node at most the number of GPUs"
        )
    if device.index not in (None, local_rank):
        log.warning("trainer.device=%s ignored under torchrun: rank uses cuda:%d", name, local_rank)
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@contextmanager
def process_group(device_name: str, timeout_s: float) -> Iterator[torch.device]:
    """Join torchrun's process group for the block (and always leave it); yield this rank's
    device. Outside torchrun nothing is joined and the device is ``trainer.device``'s."""
    size, rank_, local = env_ranks()
    if size == 1:
        yield resolve_device(device_name)
        return
    device = rank_device(device_name, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        quiet_other_ranks()
        log.info("DDP: %d processes on %s (backend %s)", size, device.type, backend)
        yield device
        # leave together: a rank that tore gloo down while rank 0 still wrote the run was seen
        # to abort once in a loaded test run (SIGABRT, "terminate called without an active
        # exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def quiet_other_ranks() -> None:
    """Ranks other than 0 write no log file and show only warnings and errors on the console,
    so the run's ``train.log`` and the terminal read like those of a single process."""
    if is_main():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setLevel(logging.WARNING)


def shared_out_dir(out_dir: Path) -> Path:
    """Rank 0's run folder, on every rank.

    Hydra's default run folder holds the start time to the second, so ranks that start a
    second apart would compose different folders; the run then goes to rank 0's, and a folder
    another rank's Hydra created holding nothing of ours is removed. Pass ``hydra.run.dir`` to
    torchrun runs to avoid the question altogether.
    """
    if world_size() == 1:
        return out_dir
    dirs = gather(str(out_dir))
    if len(set(dirs)) > 1 and is_main():
        log.warning(
            "ranks composed different run folders %s: using rank 0's; pass hydra.run.dir=DIR "
            "to torchrun runs",
            sorted(set(dirs)),
        )
    chosen = Path(dirs[0])
    if chosen.resolve() != out_dir.resolve():
        _remove_if_only_hydra(out_dir)
    return chosen


def _remove_if_only_hydra(folder: Path) -> None:
    """Delete ``folder`` if it holds only what Hydra put there (``.hydra/``, empty logs)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        empty_log = entry.suffix == ".log" and entry.is_file() and entry.stat().st_size == 0
        if entry.name != ".hydra" and not empty_log:
            return
    shutil.rmtree(folder, ignore_errors=True)


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without DDP)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others, e.g. to generate a synthetic set once."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def train_sampler(dataset, seed: int) -> torch.utils.data.DistributedSampler | None:
    """Each rank's shard of the training set, reshuffled every epoch (``set_epoch``); the last
    shard is padded with repeats so every rank runs the same number of steps."""
    if world_size() == 1:
        return None
    return torch.utils.data.DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed
    )


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model DDP trains (gradients averaged over ranks in backward); the model itself
    without DDP. Call after ``channels_last`` and device moves: DDP's gradient buckets are laid
    out for the parameters as they are at wrapping."""
    if world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model (no ``module.`` prefix in its state dict, so checkpoints match)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the parameters: equal on every rank when gradients were averaged."""
    h = hashlib.sha256()
    for name, p in unwrap(model).named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_in_sync(model: nn.Module) -> None:
    """Fail loudly if the ranks ended with different weights (under DDP they must not)."""
    if world_size() == 1:
        return
    digests = gather(weights_digest(model))
    if len(set(digests)) > 1:
        raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
    log.info("DDP: weights identical on all %d ranks (sha256 %s)", len(digests), digests[0][:12])
