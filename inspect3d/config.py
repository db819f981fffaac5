"""Typed schemas for the plain settings, registered with Hydra's ConfigStore.

A typo or a wrong type in ``data.*`` or ``trainer.*`` then fails when the config is composed,
not an hour into training. ``model`` and ``optim`` are ``_target_`` nodes (instantiated).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from inspect3d.data.preprocess import Preprocess
from inspect3d.data.synth import SynthConfig

# The configs ship inside the package (a wheel has them); the top-level configs/ of the repo is
# a link to this folder, the one place users read and copy them from.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _settings_of(source: type, name: str, extra: tuple = (), skip: tuple = ()) -> type:
    """A mutable schema with the fields (and defaults) of the dataclass ``source``, less
    ``skip``, after the ``extra`` fields: the code's dataclass stays the one definition."""
    own = [(f.name, f.type, field(default=f.default)) for f in fields(source) if f.name not in skip]
    schema = make_dataclass(name, [*extra, *own])
    schema.__module__ = __name__
    return schema


# ``data.synth`` (kind=synth): what to generate (inspect3d.data.synth.SynthConfig)
SynthSettings = _settings_of(SynthConfig, "SynthSettings", skip=("overwrite",))
# ``inspect3d synth out=DIR ...`` (configs/synth.yaml)
SynthCommand = _settings_of(
    SynthConfig, "SynthCommand", extra=(("out", str, field(default=MISSING)),)
)
_PRE = Preprocess()  # the preprocessing defaults (inspect3d.data.preprocess)


@dataclass
class AugmentConfig:
    """``data.augment``: training-only augmentation for camera and printer shift
    (inspect3d.train.augment). Each is applied to a random share ``p`` of the training layers at
    a strength drawn up to its value; 0 turns one off, ``data/augment=none`` all of them."""

    p: float = 0.5
    scale: float = 0.1  # zoom by a factor in [1/(1+s), 1+s]
    crop: float = 0.05  # crop offset, up to this fraction of the layer size
    rotate: float = 3.0  # degrees
    perspective: float = 0.03  # corners moved by up to this fraction of the size
    blur: float = 0.8  # Gaussian sigma, pixels of the model input (1-3 px streaks must stay)
    noise: float = 3.0  # sensor noise sigma, grey levels
    gamma: float = 0.2  # tone-curve exponent in [1/(1+g), 1+g]
    white_balance: float = 0.08  # colour layers: gain per channel 1 +- this
    colour: float = 0.2  # colour layers: saturation 1 +- this
    # framing (FDM photos): a layer shrunk by a factor down to 1 - inset and set into a normal
    # layer of the same batch, keeping its label (the part small in a wider view); 0: off
    inset: float = 0.0


@dataclass
class DataConfig:
    kind: str = "folder"  # folder | manifest | synth
    root: str = MISSING
    normal_class: str = MISSING
    manifest: str | None = None  # kind=manifest: CSV path (default ROOT/manifest.csv)
    val_root: str | None = None  # a separate validation folder instead of a split
    # eval only: MASK_ROOT/<layer file stem>.<any image ext>, non-zero = defect; no file = clean
    mask_root: str | None = None
    # preprocessing (inspect3d.data.preprocess.Preprocess, whose defaults these are)
    height: int = _PRE.height
    width: int = _PRE.width
    channels: int | None = None  # 1 grey, 3 colour; null: detected from the layers (logged)
    norm: str = _PRE.norm  # per_image | fixed
    mean: float = _PRE.mean
    std: float = _PRE.std
    # leak-free split (inspect3d.data.splits)
    folds: int = 5
    fold: int = 0
    block_size: int = 16
    purge_gap: int = 2
    subsample: int = 1  # train on every n-th layer of a sequence (neighbours look alike)
    # augmentation (training only): flips, brightness/contrast, and camera shift (augment)
    jitter: float = 0.2  # brightness and contrast jitter, as a fraction
    hflip: bool = True
    vflip: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synth: SynthSettings = field(default_factory=SynthSettings)


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    num_workers: int = 0
    resume: str | None = None  # path to a last.pt to continue from
    target_frr: float = 0.05  # false-reject rate on normal val layers for the threshold
    class_weights: str = "balanced"  # balanced | none
    # the epoch the run keeps (checkpoint.pt): best = highest validation macro-F1 (ties: lower
    # validation loss); last = the final epoch, for validation sets too small to choose by
    keep: str = "best"
    map_loss_weight: float = (
        1.0  # defect-map loss from masks / normal layers (0: layer labels only)
    )
    warmup_epochs: float = 0.5
    grad_clip: float = 5.0
    max_steps_per_epoch: int | None = None
    progress: bool = True
    # under torchrun: seconds a rank waits for the others (e.g. while rank 0 validates)
    dist_timeout_s: int = 1800


@dataclass
class NormalConfig:
    """``inspect3d fit-normal``: an anomaly model from good layers only (inspect3d.normal)."""

    method: str = "patchcore"  # patchcore (coreset memory bank) | gaussian (shrunk Mahalanobis)
    # input: native = the layers' own size, aspect kept (long side at most max_side);
    # data = data.height x data.width
    resolution: str = "native"
    max_side: int = 2048
    # region of interest (the build plate): auto = found from the good layers (the whole layer
    # when no static frame is seen), null = all, [x0, y0, x1, y1] or [[x, y], ...] in pixels
    # of the layer or fractions of it
    roi: Any = "auto"
    grid_stride: int = 8  # input pixels per defect-map cell: 8 or 16
    smooth_px: float = 4.0  # Gaussian smoothing of the map (sigma, input pixels); 0: none
    layer_score: str = "topk"  # topk: mean of the top-k patch distances | max
    topk: int = 10
    # patchcore: compare whitened features (the good powder patches' covariance, shrunk by
    # ``shrinkage``): faint defects move patches along directions the texture leaves quiet
    whiten: bool = True
    shrinkage: float = 0.01  # covariance shrinkage towards a scaled identity (whiten, gaussian)
    # patchcore: patches also carry pixel-scale residual channels (thin streaks, pits, spatter
    # that the stride-8 features dilute), judged against their nearest good patches' residuals
    # (patchcore only, and not with use_parts: together they flagged 63/98
    # clean new-job eos_parts layers). Off by default: on defects drawn into real layers it
    # raised pixel AUROC (eos_parts 0.79 -> 0.82, PBLM 0.79 -> 0.84, map maxima as before) and
    # held the synthetic normal_maps seeds, but the demo's held-out jobs fell 0.956 -> 0.907
    # (AUPRO 0.873 -> 0.798, peaks 42 -> 36 of 53; docs/quality.md, implanted): fitted across
    # two printers, its bank covers the frame's edges too thinly (coresets that cover them cost
    # eos_parts 0.01-0.02)
    residual: bool = False
    # how much the residual distance counts: 1 = its 99th percentile over good patches equals
    # the nearest-patch distance's; more favours thin pixel detail, less the deep features
    # (1.0: PBLM the same, eos_parts 0.83, but fewer map maxima on the defect everywhere)
    residual_weight: float = 0.5
    # pixel evidence fused into the map: deep distance^(1-w) x pixel evidence^w, the pixel
    # evidence the strongest 1-3 px line / speck / pit response of a cell in units of the good
    # cells' 99th percentile (normal.patch.PixelEvidence); 0: the deep distance alone. 0.2 on
    # defects drawn into real layers: pixel AUROC eos_parts 0.79 -> 0.87, PBLM 0.79 -> 0.88,
    # synthetic jobs with parts 0.949 -> 0.940 (0.973 with part masks). Off by default: on the
    # demo's held-out jobs (one model over two printers, so the ROI keeps the frame, whose
    # edges it lights) pixel AUROC fell 0.956 -> 0.790 (docs/quality.md, implanted)
    pixel_weight: float = 0.0
    bank_size: int = 2048  # patchcore: patches kept in the memory bank
    coreset_pool: int = 100000  # patchcore: random good patches the coreset is chosen from
    # part masks (ROOT/_parts/<layer file name>): a part memory and a part input. Off by
    # default: measured on eos_parts (fitted on 2 jobs) it raised false alarms on new jobs from
    # 0/66 to 23/66, though it helps on the synthetic printer (docs/quality.md, normal_maps)
    use_parts: bool = False
    mirror: bool = True  # the bank also holds the good layers mirrored (parts of any handedness)
    # ... and turned by this many evenly spaced angles (part edges in any orientation); 0: none
    rotations: int = 4
    part_share: float = 0.25
    target_frr: float = 0.01  # false-reject rate the threshold aims at
    # out-of-fold scores of the good layers set the threshold; what the folds hold out:
    # auto = whole jobs when the good layers come from 2+ jobs (at most calib_folds folds),
    # else regions of the layers (calib_grid x calib_grid, each scored by a scorer fitted on
    # the others: parts at places it never saw, as in new jobs); job | region | block
    # (calib_folds contiguous blocks of the layer sequence)
    calib_by: str = "auto"
    calib_folds: int = 3
    calib_grid: int = 2
    max_layers: int | None = None  # use at most this many good layers (evenly spaced)
    batch_size: int = 8  # lowered automatically to fit memory_gb
    memory_gb: float | None = None  # memory for a batch of features; default 1/4 of free RAM
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="normal", name="base_normal", node=NormalConfig)
    cs.store(name="base_synth", node=SynthCommand)


register_configs()


def compose(name: str, overrides: list[str]):
    """``configs/<name>.yaml`` with Hydra overrides, as the commands compose it (for scripts,
    benchmarks and tests that call the task functions directly)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=overrides)
