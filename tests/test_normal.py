"""Normal-only mode: fit on good layers, calibrated threshold, export parity, eval, the maths."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch

from inspect3d.errors import InspectError
from inspect3d.infer import OnnxModel
from inspect3d.metrics import order_statistic_frr
from inspect3d.models.checkpoint import load_checkpoint, model_from_checkpoint
from inspect3d.normal.fit import fit_normal, fold_ids
from inspect3d.normal.patch import Gaussian, MemoryBank
from inspect3d.normal.stats import greedy_coreset, shrunk_gaussian

from conftest import SIZE, compose, folder_overrides
from isolate import isolated


def normal_overrides(root, *extra: str) -> list[str]:
    return [*folder_overrides(root), "normal.progress=false", *extra]


def fit_and_export(root, run, *extra: str):
    from inspect3d.export.onnx import export_run

    # the pipeline's checks; rotated views are tested in test_normal_maps.py
    cfg = compose("fit_normal", normal_overrides(root, "normal.rotations=0", *extra))
    summary, path = isolated(fit_normal, cfg, run)
    assert path == run / "checkpoint.pt" and "expected FRR" in summary
    isolated(export_run, compose("export", [f"run={run}", "n_check=4"]))  # fails past the tolerance
    return run


@pytest.fixture(scope="module")
def normal_run(synth_dir, tmp_path_factory):
    return fit_and_export(synth_dir, tmp_path_factory.mktemp("normal"), "normal.bank_size=64")


@pytest.mark.slow  # a second ONNX export (~20 s CPU); the PatchCore one above runs always
def test_gaussian_exports_with_parity(synth_dir, holdout_dir, tmp_path):
    run = fit_and_export(synth_dir, tmp_path, "normal.method=gaussian", "normal.max_layers=8")
    test_onnx_matches_torch_on_new_layers(run, holdout_dir)
    assert OnnxModel.load(run / "model.onnx").meta.model_name == "efficientnet_lite0+gaussian"


def test_residual_channels_export_with_parity(synth_dir, holdout_dir, tmp_path):
    run = fit_and_export(
        synth_dir, tmp_path, "normal.residual=true", "normal.bank_size=64", "normal.max_layers=8"
    )
    net = model_from_checkpoint(load_checkpoint(run / "checkpoint.pt"))
    assert net.features.out_channels == 152 + 8 and float(net.scorer.res_weight) > 0
    test_onnx_matches_torch_on_new_layers(run, holdout_dir)


def test_pixel_evidence_exports_with_parity(synth_dir, holdout_dir, tmp_path):
    run = fit_and_export(
        synth_dir, tmp_path, "normal.pixel_weight=0.2", "normal.bank_size=64", "normal.max_layers=8"
    )
    net = model_from_checkpoint(load_checkpoint(run / "checkpoint.pt"))
    assert net.pixel is not None and float(net.pixel.scale.min()) > 1e-3  # units were fitted
    test_onnx_matches_torch_on_new_layers(run, holdout_dir)


def test_export_has_supervised_outputs_and_normal_only_metadata(normal_run):
    model = OnnxModel.load(normal_run / "model.onnx")
    meta = model.meta
    assert meta.mode == "normal_only" and meta.classes == ["ok", "defect"]
    assert meta.threshold == 0.5
    cal = meta.calibration
    assert cal["target_frr"] == 0.01 and cal["n_calibration"] >= 4
    lo, hi = cal["frr_ci95"]
    assert 0 <= lo < cal["expected_frr"] < hi <= 1
    props = {p.key: p.value for p in onnx.load(str(normal_run / "model.onnx")).metadata_props}
    assert json.loads(props["calibration"])["expected_frr"] == pytest.approx(cal["expected_frr"])
    layer = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    score = model.predict(layer)
    assert score.decision in ("ok", "defect") and 0 <= score.defect_score <= 1
    assert score.defect_map.shape == (SIZE // 8, SIZE // 8)  # stride-8 map by default
    # the map is in units of the threshold (1.0 = threshold), not squashed into [0, 1]
    assert model.map_threshold == 1.0 and score.defect_map.min() >= 0


def test_onnx_matches_torch_on_new_layers(normal_run, holdout_dir):
    from inspect3d.data.manifest import scan_folder
    from inspect3d.models import ScoringNet

    ckpt = load_checkpoint(normal_run / "checkpoint.pt")
    net = ScoringNet(model_from_checkpoint(ckpt)).eval()
    model = OnnxModel.load(normal_run / "model.onnx")
    batch = np.stack([model.pre.load(it.path) for it in scan_folder(holdout_dir)[:6]])
    with torch.inference_mode():
        probs, maps = (t.numpy() for t in net(torch.from_numpy(batch)))
    onnx_probs, onnx_maps = model.run(batch)
    assert np.abs(probs - onnx_probs).max() < 1e-4
    assert np.abs(maps - onnx_maps).max() < 1e-4


def test_defect_score_crosses_one_half_at_the_calibrated_distance(normal_run, holdout_dir):
    from inspect3d.data.manifest import scan_folder

    ckpt = load_checkpoint(normal_run / "checkpoint.pt")
    net = model_from_checkpoint(ckpt)
    model = OnnxModel.load(normal_run / "model.onnx")
    batch = torch.from_numpy(
        np.stack([model.pre.load(it.path) for it in scan_folder(holdout_dir)[:8]])
    )
    with torch.inference_mode():
        distance, _ = net.distances(batch)
        logits, _ = net(batch)
    defect = torch.softmax(logits, 1)[:, 1]
    t = float(ckpt["calibration"]["distance_threshold"])
    assert float(net.threshold) == pytest.approx(t)
    assert torch.equal(defect >= 0.5, distance >= t)
    # the out-of-fold scores of the good layers mostly stay below the threshold
    oof = np.array(json.loads((normal_run / "metrics.json").read_text())["oof_scores"])
    assert (oof < t).mean() >= 0.99


def test_eval_counts_every_other_class_as_defect(normal_run, holdout_dir, tmp_path):
    from inspect3d.data.manifest import scan_folder
    from inspect3d.train.evaluate import evaluate_run

    out = tmp_path / "eval.json"
    overrides = normal_overrides(holdout_dir, f"run={normal_run}", f"out={out}")
    metrics = isolated(evaluate_run, compose("eval", [o for o in overrides if "progress" not in o]))
    items = scan_folder(holdout_dir)
    assert metrics["n_defect"] == sum(it.label != "ok" for it in items) > 0
    assert metrics["mode"] == "normal_only" and metrics["auroc"] is not None
    assert set(metrics["by_source_class"]) == {it.label for it in items}


def test_eval_of_a_normal_only_run_needs_data(normal_run, tmp_path):
    from inspect3d.train.evaluate import evaluate_run

    with pytest.raises(InspectError, match="normal-only.*data=folder"):
        isolated(evaluate_run, compose("eval", [f"run={normal_run}", f"out={tmp_path / 'e.json'}"]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.normal_class=good", r"data.normal_class='good' has no layers.*'ok'"),
        ("normal.rotations=-2", r"normal.rotations=-2 is not valid: use 0"),
        ("normal.method=knn", r"normal.method='knn'.*gaussian"),
        (
            "normal.residual=true normal.method=gaussian",
            r"normal.residual=true is not valid with normal.method='gaussian'.*patchcore",
        ),
        (
            "normal.residual=true normal.use_parts=true",
            r"normal.residual=true is not valid with normal.use_parts=true.*one of the two",
        ),
        (
            "normal.residual_weight=0",
            r"normal.residual_weight=0.0 is not valid: use a number above 0",
        ),
        (
            "normal.pixel_weight=1.0",
            r"normal.pixel_weight=1.0 is not valid: use a number in \[0, 1\)",
        ),
        ("normal.calib_by=layers", r"normal.calib_by='layers'.*'region'"),
        ("normal.calib_grid=1", r"normal.calib_grid=1 is not valid: use 2 or more"),
        ("model=resnet18", r"model='resnet18'.*efficientnet_lite0"),
    ],
)
def test_fit_normal_refuses_bad_settings(synth_dir, tmp_path, override, message):
    with pytest.raises(InspectError, match=message):
        cfg = compose("fit_normal", normal_overrides(synth_dir, *override.split()))
        isolated(fit_normal, cfg, tmp_path)


def test_folds_are_contiguous_and_keep_duplicates_together():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(4, axis=1)
    images[9] = images[0]  # an exact duplicate at the far end
    folds = fold_ids(images, 5)
    assert folds.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 0]


def test_frr_interval_of_the_order_statistic():
    rec = order_statistic_frr(20, 0)  # threshold above the highest of 20 good scores
    assert rec["expected_frr"] == pytest.approx(1 / 21)
    lo, hi = rec["frr_ci95"]  # Beta(1, 20): closed-form quantiles
    assert lo == pytest.approx(1 - 0.975 ** (1 / 20), rel=1e-6)
    assert hi == pytest.approx(1 - 0.025 ** (1 / 20), rel=1e-6)


def test_gaussian_scorer_is_the_mahalanobis_distance():
    torch.manual_seed(0)
    patches = torch.randn(500, 6) @ torch.randn(6, 6)
    mean, whiten = shrunk_gaussian(patches, 0.0)
    scorer = Gaussian(6)
    scorer.set_stats(mean, whiten)
    f = torch.randn(1, 6, 2, 3)
    got = scorer(f).flatten()
    cov = np.cov(patches.double().numpy(), rowvar=False) + 1e-6 * np.eye(6)
    diff = f.flatten(2)[0].T.double().numpy() - patches.double().numpy().mean(0)
    want = np.sqrt(np.einsum("ij,jk,ik->i", diff, np.linalg.inv(cov), diff))
    assert np.allclose(got.numpy(), want, rtol=1e-3)


def test_memory_bank_gives_nearest_neighbour_distance_and_coreset_covers():
    torch.manual_seed(0)
    patches = torch.randn(400, 5)
    idx = greedy_coreset(patches, 40, proj_dim=64)
    assert len(set(idx.tolist())) == 40
    bank = MemoryBank(40, 5)
    bank.set_bank(patches[idx])
    f = torch.randn(2, 5, 3, 4)
    got = bank(f).flatten()
    want = torch.cdist(f.permute(0, 2, 3, 1).reshape(-1, 5), patches[idx]).min(1).values
    assert torch.allclose(got, want, atol=1e-4)
    # k-centre: every patch lies within the coreset's covering radius of a kept one
    covering = torch.cdist(patches, patches[idx]).min(1).values.max()
    random_pick = torch.cdist(patches, patches[:40]).min(1).values.max()
    assert covering < random_pick
    assert math.isfinite(float(covering))
