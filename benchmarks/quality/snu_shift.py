"""SNU FDM across photo sources: trained on one kind of photo, scored on the other.

SNU's files do not say which photos are lab photos and which come from the web (camera EXIF is
in 33 of 327, from 30 different cameras: web photos keep theirs too). What the files do say is
their size, and size follows the source: photos with a long side >= 800 px (105: full camera
frames) against smaller ones (222: web images, scaled down and recompressed). So the shift
measured here is "large" -> "small" and back, each photo its own job, nothing of the test
group in training.

Each direction trains through the product path, ``inspect3d train`` on the snu_fdm settings
(colour, 384 px, camera augmentation), with ``experiment=probe`` (frozen ImageNet Lite0 + head,
mean pooling, features of the photos as they are) and with ``experiment=fdm`` (the README's
start for FDM photos: the same probe with log-sum-exp pooling and 4 training views per photo,
framing inset among the augmentations), and scores the other group
- as it is;
- as a webcam would give it: long side scaled to 320 px, a colour cast, JPEG at quality 35;
- framed wide: each photo shrunk to 50% or 30% of the height of a 640x480 view whose rest is a
  good photo of the same test group (the failure, if any, a part of the view, as in a webcam
  frame of a whole printer). The ``fdm`` training insets photos too (into good photos of the
  training group), so this condition favours it by construction; ``probe`` sees no inset.
These stand in for another printer's webcam frames, which the team does not have.

    python benchmarks/quality/snu_shift.py [--root DIR] [--variants probe,fdm]

Results: docs/quality/snu_shift.json and the ``snu_shift`` section of docs/quality.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import common
import cv2
import numpy as np
from snu_fdm_cv import pooled_items

from inspect3d.data.manifest import Item, write_manifest
from inspect3d.metrics import auroc, bootstrap_ci
from inspect3d.watch.imageinfo import image_info

NAME = "snu_shift"
LARGE_PX = 800  # long side from which a photo counts as a full camera frame
WEBCAM_PX, WEBCAM_JPEG, WEBCAM_GAINS = 320, 35, (1.10, 1.0, 0.88)  # B, G, R gains: warm cast
DIRECTIONS = (("large", "small"), ("small", "large"))
SIZE = 384


def by_source(items: list[Item]) -> dict[str, list[Item]]:
    """The photos by size: ``large`` (long side >= LARGE_PX) and ``small``."""
    out: dict[str, list[Item]] = {"large": [], "small": []}
    for it in items:
        info = image_info(it.path.read_bytes(), it.path.name)
        out["large" if max(info.width, info.height) >= LARGE_PX else "small"].append(it)
    return out


def webcam_copies(items: list[Item], dest: Path) -> list[Item]:
    """The photos as a webcam would give them: small, colour cast, strongly compressed."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, it in enumerate(items):
        img = cv2.imread(str(it.path), cv2.IMREAD_COLOR)
        f = WEBCAM_PX / max(img.shape[:2])
        if f < 1:
            img = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        img = np.clip(img * np.array(WEBCAM_GAINS), 0, 255).astype(np.uint8)
        path = dest / f"{i:04d}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, WEBCAM_JPEG])
        out.append(replace(it, path=path))
    return out


def framed(items: list[Item], frac: float, dest: Path, seed: int = 0) -> list[Item]:
    """Each photo shrunk to ``frac`` of a 640x480 view's height, at a random place in a good
    photo of ``items`` (a failure then fills part of the view); labels kept."""
    rng = np.random.default_rng(seed)
    good = [it for it in items if it.label == "success"]
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, it in enumerate(items):
        view = cv2.imread(str(good[rng.integers(len(good))].path), cv2.IMREAD_COLOR)
        view = cv2.resize(view, (640, 480), interpolation=cv2.INTER_AREA)
        img = cv2.imread(str(it.path), cv2.IMREAD_COLOR)
        f = frac * 480 / max(img.shape[:2])
        img = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
        top, left = rng.integers(0, 480 - h + 1), rng.integers(0, 640 - w + 1)
        view[top : top + h, left : left + w] = img
        path = dest / f"{i:04d}.jpg"
        cv2.imwrite(str(path), view, [cv2.IMWRITE_JPEG_QUALITY, 90])
        out.append(replace(it, path=path))
    return out


def overrides(manifest_dir: Path, experiment: str) -> list[str]:
    """``experiment`` (probe or fdm) on the snu_fdm settings, the photos from a manifest."""
    return [
        "data=manifest",
        f"data.root={manifest_dir}",
        "data.normal_class=success",
        "data.channels=3",
        f"data.height={SIZE}",
        f"data.width={SIZE}",
        "data.vflip=true",
        "data.purge_gap=0",
        f"experiment={experiment}",
        f"seed={common.SEED}",
    ]


def figures(items: list[Item], probs: np.ndarray) -> dict:
    """AUROC of the failure score with a bootstrap interval over photos, accuracy at argmax."""
    y = np.array([int(it.label != "success") for it in items])
    correct = int((probs.argmax(1) == y).sum())
    return {
        "n": len(y),
        "n_failure": int(y.sum()),
        "auroc": auroc(y, probs[:, 1]),
        "auroc_ci95": bootstrap_ci(lambda t, p: auroc(t, p[:, 1]), y, probs, None),
        "accuracy": correct / len(y),
        "accuracy_wilson95": common.wilson(correct, len(y)),
    }


def run(direction: tuple[str, str], variant: str, groups: dict, work: Path) -> dict:
    """Train on one group, score the other as it is, as webcam copies and framed wide."""
    from inspect3d.train.run import train

    src, dst = direction
    out = work / f"{src}-to-{dst}" / variant
    write_manifest(groups[src], out / "manifest.csv")
    t = time.time()
    _, ckpt = train(common.compose_train(overrides(out, variant)), out / "run")
    train_s = time.time() - t
    tests = {
        "as is": groups[dst],
        "webcam": webcam_copies(groups[dst], work / f"webcam-{dst}"),
        "framed 50%": framed(groups[dst], 0.5, work / f"framed50-{dst}"),
        "framed 30%": framed(groups[dst], 0.3, work / f"framed30-{dst}"),
    }
    scored = {k: figures(v, common.predict_items(ckpt, v)) for k, v in tests.items()}
    return {"train": src, "test": dst, "variant": variant, "n_train": len(groups[src]),
            "train_s": train_s, "scored": scored}  # fmt: skip


def section(r: dict) -> str:
    rows = []
    for run_ in r["runs"]:
        for kind, f in run_["scored"].items():
            acc = f"{f['accuracy']:.3f} [{f['accuracy_wilson95'][0]:.3f}, "
            acc += f"{f['accuracy_wilson95'][1]:.3f}]"
            rows.append(
                f"| {run_['train']} ({run_['n_train']}) | {run_['test']}, {kind} | "
                f"{run_['variant']} | {f['n']} ({f['n_failure']} failure) | "
                f"{common.fmt_ci(f['auroc'], f['auroc_ci95'])} | {acc} |"
            )
    g = r["groups"]
    return "\n".join(
        [
            "## SNU FDM across photo sources (issue 13): trained on one kind, scored on the other",
            "",
            f"Photos by size, the one thing the files say of their source: {g['large']} with a "
            f"long side >= {LARGE_PX} px (full camera frames) and {g['small']} smaller (web "
            "images). `inspect3d train experiment=probe` (the README's model for FDM photos) "
            f"on one group, colour at {SIZE} px, the snu_fdm settings, 30 head epochs, and "
            "`experiment=fdm` (the same with log-sum-exp pooling, r = 3, and 4 training views "
            "per photo, 3 augmented, framing inset 0.6 among them); scored on the other group "
            f"as it is, as webcam copies (long side {WEBCAM_PX} px, a warm colour cast, JPEG "
            f"quality {WEBCAM_JPEG}) and framed wide (shrunk to 50% or 30% of a 640x480 view's "
            "height, the rest a good photo of the test group; `fdm` is trained with insets "
            "of the same kind, so this favours it by construction). AUROC intervals: "
            "bootstrap over photos; accuracy: argmax, Wilson.",
            "",
            "| trained on (photos) | scored on | experiment | N | AUROC [95% CI] "
            "| accuracy [95% CI] |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "Command: `.venv/bin/python benchmarks/quality/snu_shift.py` "
            f"({common.machine_line(r['machine'])}).",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", type=Path, default=common.DATASETS / "snu_fdm")
    ap.add_argument("--variants", default="probe,fdm")
    args = ap.parse_args()
    m = common.print_machine()
    groups = by_source(pooled_items(args.root))
    work = common.WORK / NAME
    runs = [run(d, v, groups, work) for d in DIRECTIONS for v in args.variants.split(",") if v]
    results = {"machine": m, "groups": {k: len(v) for k, v in groups.items()}, "runs": runs}
    common.save_results(common.RESULTS, NAME, results)
    text = section(results)
    common.update_section(NAME, text)
    print(text)


if __name__ == "__main__":
    main()
