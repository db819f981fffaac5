"""``train(cfg, out_dir) -> (metrics, checkpoint path)``: the whole training run."""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from inspect3d.data.layers import load_layers
from inspect3d.data.sources import LayerData, load_data, preprocess_of
from inspect3d.errors import InspectError
from inspect3d.io import write_json_atomic
from inspect3d.metrics import calibrate_threshold, summarize
from inspect3d.models import HeadNet
from inspect3d.models.checkpoint import (
    config_hash,
    load_checkpoint,
    load_weights,
    model_from_config,
    save_checkpoint,
)
from inspect3d.models.device import memory_format
from inspect3d.train import distributed
from inspect3d.train.augment import augment_settings
from inspect3d.train.dataset import LayerDataset, load_masks
from inspect3d.train.freeze import (
    FreezePlan,
    Views,
    feature_dataset,
    freeze_plan,
    make_optimizer,
)
from inspect3d.train.loop import EpochSpec, Optimisation, StepTimes, predict, train_one_epoch
from inspect3d.train.plots import plot_confusion, plot_curves

log = logging.getLogger(__name__)

DATA_WAIT_GOAL = 0.05  # above this share of step time waiting for batches, say what to do


@dataclass
class Loaders:
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    sampler: torch.utils.data.DistributedSampler | None = None  # under DDP: this rank's shard


@dataclass(frozen=True)
class RunSetup:
    """What one run trains: its config, data, preprocessing and freeze plan, and its folder."""

    cfg: DictConfig
    data: LayerData
    pre: Any
    plan: Any
    out_dir: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_loaders(data: LayerData, pre, trainer: Any, seed: int) -> Loaders:
    labels = data.labels()
    used = sorted(set(data.train) | set(data.val))
    progress = trainer.progress and distributed.is_main()
    images = load_layers([data.items[i] for i in used], pre, progress)
    masks, known = load_masks([data.items[i] for i in used], [labels[i] for i in used], pre)
    pos = {i: k for k, i in enumerate(used)}

    def subset(idx: list[int]) -> LayerDataset:
        rows = [pos[i] for i in idx]
        return LayerDataset(images[rows], [labels[i] for i in idx], (masks[rows], known[rows]))

    return loaders_of(subset(data.train), subset(data.val), trainer, seed)


def loaders_of(train_set, val_set, trainer: Any, seed: int) -> Loaders:
    """Shuffled (under DDP: sharded) training batches and in-order validation batches."""
    gen = torch.Generator().manual_seed(seed)
    opts = {
        "batch_size": trainer.batch_size,
        "num_workers": trainer.num_workers,
        "pin_memory": torch.cuda.is_available(),
    }
    sampler = distributed.train_sampler(train_set, seed)
    n = len(train_set) if sampler is None else len(sampler)
    return Loaders(
        train=torch.utils.data.DataLoader(
            train_set,
            shuffle=sampler is None,
            sampler=sampler,
            generator=gen,
            drop_last=n > trainer.batch_size,
            **opts,
        ),
        val=torch.utils.data.DataLoader(val_set, shuffle=False, **opts),
        sampler=sampler,
    )


def class_weights(labels: list[int], k: int, mode: str) -> torch.Tensor | None:
    """Inverse-frequency weights so a rare class (often the normal one) still counts."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise InspectError(f"trainer.class_weights={mode!r} is not valid: use balanced or none")
    counts = np.bincount(labels, minlength=k).astype(float)
    return torch.tensor(len(labels) / (k * np.maximum(counts, 1)), dtype=torch.float32)


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + np.cos(np.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def discard_failed_run(out_dir: str | Path) -> bool:
    """Remove the folder of a run that failed before it wrote anything but logs; True if removed.

    Hydra makes the run folder (``.hydra/`` and ``train.log``) before training starts. Left
    behind after an early failure (bad data path, a crash in the first epoch), it looks like a
    run in ``outputs/train/`` but holds no checkpoint, so it is removed rather than renamed: the
    error is on the console, and there is nothing in the folder worth keeping. A folder holding
    anything else (a checkpoint of an earlier epoch to resume from, files of the user's own)
    stays as it is. Under torchrun only rank 0 removes it (the ranks share it).
    """
    out_dir = Path(out_dir)
    if distributed.env_ranks()[1] != 0 or not out_dir.is_dir():  # the group is gone by now
        return False
    if any(p.name != ".hydra" and p.suffix != ".log" for p in out_dir.iterdir()):
        return False
    shutil.rmtree(out_dir, ignore_errors=True)
    log.info("removed the run folder %s: the run failed before writing a checkpoint", out_dir)
    return True


def train(cfg: DictConfig, out_dir: str | Path) -> tuple[dict, Path]:
    """Train, keep the best epoch by validation macro-F1 (or the last: ``trainer.keep``),
    calibrate the threshold, save all.

    Under ``torchrun`` every rank calls this; they train together (DDP) and all return rank 0's
    metrics and checkpoint path, which only rank 0 wrote (see ``inspect3d.train.distributed``).
    """
    with distributed.process_group(cfg.trainer.device, cfg.trainer.dist_timeout_s) as device:
        return _train(cfg, distributed.shared_out_dir(Path(out_dir)), device)


KEEP = ("best", "last")


def check_keep(keep: Any) -> str:
    """``trainer.keep``: which epoch the run keeps as its checkpoint."""
    if keep not in KEEP:
        raise InspectError(
            f"trainer.keep={keep!r} is not valid: use best (highest validation macro-F1) or "
            "last (the final epoch)"
        )
    return keep


def _train(cfg: DictConfig, out_dir: Path, device: torch.device) -> tuple[dict, Path]:
    plan = freeze_plan(cfg.model, cfg.optim, cfg.trainer.epochs)  # bad settings fail first
    check_keep(cfg.trainer.keep)
    seed_everything(cfg.seed)
    with distributed.main_first():  # e.g. a synthetic set is generated once, by rank 0
        data = load_data(cfg.data, cfg.seed)
    pre = preprocess_of(cfg.data, data.items)
    _log_data(data)
    _log_scale(cfg.trainer, device)
    loaders = make_loaders(data, pre, cfg.trainer, cfg.seed)
    model = model_from_config(OmegaConf.to_container(cfg.model), len(data.classes), pre).to(device)
    if plan.probe:
        model.freeze_backbone(True)
        loaders = probe_loaders(model, loaders, cfg, plan, device)
    state = _Training(RunSetup(cfg, data, pre, plan, out_dir), model, loaders, device)
    state.fit()
    return state.finish()


def probe_loaders(
    model, loaders: Loaders, cfg: DictConfig, plan: FreezePlan, device: torch.device
) -> Loaders:
    """model.freeze=true: batches of backbone features computed once instead of pixels (of
    ``plan.views`` views of each training layer)."""
    amp = bool(cfg.trainer.amp) and device.type == "cuda"
    views = Views(plan.views, augment_settings(cfg.data), torch.Generator().manual_seed(cfg.seed))
    train_set = feature_dataset(model, loaders.train.dataset, device, amp, views)
    val_set = feature_dataset(model, loaders.val.dataset, device, amp)
    return loaders_of(train_set, val_set, cfg.trainer, cfg.seed)


def map_loss_weight(train_set, weight: float) -> float:
    """``trainer.map_loss_weight``, or 0 when no defect layer of the training set has a mask:
    the map loss would then only tell the normal layers' cells to be normal, a push towards the
    normal class that the unmasked defect layers get no counterpart of."""
    if weight > 0 and not bool((train_set.known & (train_set.labels != 0)).any()):
        log.info("no defect layer has a mask: the defect map is trained through the layer labels")
        return 0.0
    return weight


def _log_data(data: LayerData) -> None:
    log.info("classes: %s (normal: %s)", data.classes, data.normal_class)
    log.info(
        "split: %d training layers, %d validation layers, %d groups (jobs/blocks)",
        len(data.train),
        len(data.val),
        len(set(data.groups)),
    )


def _log_scale(trainer: Any, device: torch.device) -> None:
    """The batch an optimiser step sees and the threads each process computes with."""
    size = distributed.world_size()
    if size > 1:
        log.info(
            "DDP: batch %d per process x %d processes = effective batch %d (optim.lr is not "
            "scaled with it)",
            trainer.batch_size,
            size,
            trainer.batch_size * size,
        )
    log.info("device %s; torch uses %d CPU thread(s) per process", device, torch.get_num_threads())


class _Training:
    """State of one run: model, optimiser, history; epochs, checkpoints and the final report."""

    def __init__(self, run: RunSetup, model, loaders: Loaders, device: torch.device) -> None:
        cfg, data, plan = run.cfg, run.data, run.plan
        self.cfg, self.data, self.pre, self.model = cfg, data, run.pre, model
        self.loaders, self.device, self.out_dir = loaders, device, run.out_dir
        self.plan = plan
        # what batches go through: the whole net, or only its head on cached features (probe)
        self.scorer = HeadNet(model) if plan.probe else model
        t = cfg.trainer
        labels = data.labels()
        weights = class_weights([labels[i] for i in data.train], len(data.classes), t.class_weights)
        self.criterion = torch.nn.CrossEntropyLoss(
            weight=None if weights is None else weights.to(device)
        )
        self.optimizer = make_optimizer(cfg.optim, model, plan.backbone_lr_scale)
        steps = (
            len(loaders.train)
            if t.max_steps_per_epoch is None
            else min(len(loaders.train), t.max_steps_per_epoch)
        )
        self.scheduler = warmup_cosine(
            self.optimizer, steps * t.epochs, max(1, int(steps * t.warmup_epochs))
        )
        # a probe's features were computed once (augmented views among them): nothing here
        aug = None if plan.probe else augment_settings(cfg.data)
        map_weight = map_loss_weight(loaders.train.dataset, t.map_loss_weight)
        spec = EpochSpec.of_trainer(t, device, aug, map_weight)
        self.spec = replace(spec, progress=spec.progress and distributed.is_main())
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.spec.amp)
        model.to(memory_format=memory_format(device))
        self.history: list[dict] = []
        self.best = (-1.0, float("inf"))
        self.start_epoch = 1
        self.meta = self._meta()
        if t.resume:
            self._resume(t.resume)
        self.net = distributed.wrap(self.scorer, device)  # trains; self.model is saved

    def _meta(self) -> dict:
        config = OmegaConf.to_container(self.cfg, resolve=True)
        return {
            "model": OmegaConf.to_container(self.cfg.model, resolve=True),
            "classes": list(self.data.classes),
            "normal_class": self.data.normal_class,
            "preprocess": self.pre.to_dict(),
            "config": config,
            "config_hash": config_hash(config),
        }

    def _resume(self, path: str) -> None:
        ckpt = load_checkpoint(path)
        load_weights(self.model, ckpt, self.cfg.model.name)
        if "optimizer" not in ckpt:
            raise InspectError(f"{path!r} has no optimiser state: resume from a run's last.pt")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.history = list(ckpt["history"])
        self.best = tuple(ckpt["best"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    def fit(self) -> None:
        t = self.cfg.trainer
        for epoch in range(self.start_epoch, t.epochs + 1):
            self._set_frozen(epoch)
            seed = self.cfg.seed * 1000 + epoch  # same epoch, same randomness
            torch.manual_seed(seed + 7919 * distributed.rank())  # ranks draw apart
            self.loaders.train.generator.manual_seed(seed)
            if self.loaders.sampler is not None:
                self.loaders.sampler.set_epoch(epoch)
            gen = torch.Generator().manual_seed(seed + 7919 * distributed.rank())
            times = StepTimes()
            state = Optimisation(
                self.net, self.criterion, self.optimizer, self.scheduler, self.scaler
            )
            spec = replace(self.spec, desc=f"epoch {epoch}/{t.epochs}")
            loss = train_one_epoch(state, self.loaders.train, spec, gen, times)
            self._end_epoch(epoch, self._epoch_speed(loss, times))

    def _set_frozen(self, epoch: int) -> None:
        """model.freeze_epochs: the backbone is frozen up to that epoch, then trains."""
        frozen = self.plan.frozen_at(epoch)
        if self.plan.probe or frozen == self.model.backbone_frozen:
            return
        self.model.freeze_backbone(frozen)
        self.net = distributed.wrap(self.scorer, self.device)  # DDP registers trained params
        log.info(
            "epoch %d: %s",
            epoch,
            "head only (backbone frozen)"
            if frozen
            else f"whole net (backbone lr x {self.plan.backbone_lr_scale})",
        )

    def _validate(self) -> tuple[dict, np.ndarray, np.ndarray, float]:
        probs, labels, logits = predict(self.scorer, self.loaders.val, self.device, self.spec.amp)
        val_loss = (
            float(
                self.criterion(
                    torch.from_numpy(logits), torch.from_numpy(labels).to(torch.long)
                ).item()
            )
            if len(labels)
            else float("nan")
        )
        groups = [self.data.groups[i] for i in self.data.val]
        return (
            summarize(labels, probs, self.data.classes, 0, groups=groups, n_boot=0),
            probs,
            labels,
            val_loss,
        )

    def _epoch_speed(self, loss: float, times: StepTimes) -> dict:
        """Training loss and speed of the epoch over all ranks (a collective: every rank)."""
        ranks = distributed.gather({"loss": loss, **times.summary()})
        mean = lambda key: float(np.mean([r[key] for r in ranks]))  # noqa: E731
        return {
            "train_loss": mean("loss"),
            "images_per_s": float(sum(r["images_per_s"] for r in ranks)),
            "data_wait": mean("data_wait"),
            "prep": mean("prep"),
            "step_ms": mean("step_ms"),
            "rank_images": [int(r["images"]) for r in ranks],
        }

    def _end_epoch(self, epoch: int, speed: dict) -> None:
        """Rank 0 validates and saves while the other ranks wait for it."""
        if distributed.is_main():
            self._validate_and_save(epoch, speed)
        distributed.barrier()

    def _validate_and_save(self, epoch: int, speed: dict) -> None:
        metrics, _, _, val_loss = self._validate()
        train_loss = speed["train_loss"]
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": metrics["accuracy"],
            "val_macro_f1": metrics["macro_f1"],
            "val_auroc": metrics["auroc"],
            "lr": self.optimizer.param_groups[0]["lr"],
            **{k: speed[k] for k in ("images_per_s", "data_wait", "prep")},
        }
        self.history.append(row)
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, val acc %.3f, macro-F1 %.3f, AUROC %s",
            epoch,
            train_loss,
            val_loss,
            row["val_accuracy"],
            row["val_macro_f1"],
            "n/a" if row["val_auroc"] is None else f"{row['val_auroc']:.3f}",
        )
        self._log_speed(epoch, speed)
        if self._keeps((row["val_macro_f1"], val_loss)):
            save_checkpoint(self.out_dir / "checkpoint.pt", self.model, self.meta, epoch=epoch)
        save_checkpoint(
            self.out_dir / "last.pt",
            self.model,
            self.meta,
            epoch=epoch,
            history=self.history,
            best=list(self.best),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
        )

    def _keeps(self, score: tuple[float, float]) -> bool:
        """Whether this epoch becomes checkpoint.pt (``trainer.keep``); tracks the best score."""
        better = score[0] > self.best[0] or (score[0] == self.best[0] and score[1] < self.best[1])
        if better:
            self.best = score
        return self.cfg.trainer.keep == "last" or better

    def _log_speed(self, epoch: int, speed: dict) -> None:
        """The user-visible speed figure, and what to do when training waits for data."""
        ranks = speed["rank_images"]
        log.info(
            "epoch %d: %.1f images/s, data wait %.1f%% of step time (augment + copy %.1f%%), "
            "median step %.0f ms%s",
            epoch,
            speed["images_per_s"],
            100 * speed["data_wait"],
            100 * speed["prep"],
            speed["step_ms"],
            f"; layers per rank {ranks}" if len(ranks) > 1 else "",
        )
        if speed["data_wait"] > DATA_WAIT_GOAL and not self.plan.probe:  # probe steps are tiny
            log.warning(
                "training waited for batches %.0f%% of the time (goal < %.0f%%): raise "
                "trainer.num_workers (now %d); the layers are already decoded and cached in "
                "memory, so a high share means the loader is short of CPU cores",
                100 * speed["data_wait"],
                100 * DATA_WAIT_GOAL,
                self.cfg.trainer.num_workers,
            )

    def finish(self) -> tuple[dict, Path]:
        """Check the ranks agree, then rank 0 writes the reports; every rank returns them."""
        distributed.check_in_sync(self.net)
        result = self._report() if distributed.is_main() else None
        metrics, path = distributed.broadcast(result)
        return metrics, Path(path)

    def _report(self) -> tuple[dict, Path]:
        """Reload the kept epoch, calibrate the threshold on normal val layers, write reports."""
        best_path = self.out_dir / "checkpoint.pt"
        ckpt = load_checkpoint(best_path)
        load_weights(self.model, ckpt, self.cfg.model.name)
        _, probs, labels, _ = self._validate()
        target = self.cfg.trainer.target_frr
        threshold = _threshold(probs, labels, target)
        groups = [self.data.groups[i] for i in self.data.val]
        metrics = summarize(labels, probs, self.data.classes, 0, threshold, groups)
        metrics.update(
            best_epoch=ckpt["epoch"],  # the kept epoch (trainer.keep says which)
            keep=self.cfg.trainer.keep,
            target_frr=target,
            split=self._split_info(),
        )
        metrics["scale"] = {
            "world_size": distributed.world_size(),
            "effective_batch": self.cfg.trainer.batch_size * distributed.world_size(),
        }
        save_checkpoint(
            best_path,
            self.model,
            self.meta,
            epoch=ckpt["epoch"],
            threshold=threshold,
            target_frr=target,
            metrics=metrics,
            history=self.history,
        )
        write_json_atomic(self.out_dir / "metrics.json", {**metrics, "history": self.history})
        plot_curves(self.history, self.out_dir / "curves.png")
        plot_confusion(
            metrics["confusion_matrix"],
            self.data.classes,
            self.out_dir / "confusion.png",
            f"validation ({self.cfg.trainer.keep} epoch)",
        )
        log.info(
            "%s epoch %d: val macro-F1 %.3f (N=%d); threshold %.4f for FRR <= %.2f",
            self.cfg.trainer.keep,
            ckpt["epoch"],
            metrics["macro_f1"],
            metrics["n"],
            threshold,
            target,
        )
        return metrics, best_path

    def _split_info(self) -> dict:
        d = self.cfg.data
        return {
            "fold": d.fold,
            "folds": d.folds,
            "block_size": d.block_size,
            "purge_gap": d.purge_gap,
            "val_root": d.val_root,
            "n_train": len(self.data.train),
            "n_val": len(self.data.val),
        }


def _threshold(probs: np.ndarray, labels: np.ndarray, target_frr: float) -> float | None:
    normal = 1.0 - probs[labels == 0, 0]
    if normal.size == 0:
        log.warning("no normal layers in the validation split: threshold left at 0.5")
        return 0.5
    if normal.size < 1 / max(target_frr, 1e-9):
        log.warning(
            "threshold calibrated on only %d normal layers: too few to resolve a %.1f%% "
            "false-reject rate; recalibrate on more normal layers",
            normal.size,
            100 * target_frr,
        )
    return calibrate_threshold(normal, target_frr)
