"""Fast checks of the quality benchmarks' own arithmetic (no training, no real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inspect3d.data.manifest import Item

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"


@pytest.fixture
def bench(monkeypatch):
    """The benchmark scripts import their helpers as top-level modules, as `python X.py` does."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common
    import watch_policy

    return common, watch_policy


def test_wilson_interval(bench):
    common, _ = bench
    lo, hi = common.wilson(0, 100)
    assert lo == 0.0 and 0.03 < hi < 0.04  # rule of three, roughly
    lo, hi = common.wilson(5, 10)
    assert lo == pytest.approx(1 - hi)
    assert common.wilson(0, 0) is None


def test_baseline_probs_keep_the_nearest_class(bench):
    common, _ = bench
    train_x = np.array([[0.0], [10.0], [20.0]])
    train_y = np.array([0, 1, 2])
    pred, score = common.nearest(train_x, train_y, np.array([[1.0], [19.0]]))
    assert pred.tolist() == [0, 2]
    probs = common.probs_from_scores(pred, score, 3)
    assert probs.argmax(1).tolist() == [0, 2]
    assert score[0] < 0.5 < score[1]


def test_update_section_replaces_only_its_own_block(bench, tmp_path):
    common, _ = bench
    doc = tmp_path / "quality.md"
    doc.write_text("# title\n\n<!-- quality:a begin -->\nold\n<!-- quality:a end -->\ntail\n")
    common.update_section("a", "new", doc)
    common.update_section("b", "added", doc)
    text = doc.read_text()
    assert "old" not in text and "new" in text and text.index("tail") < text.index("added")
    common.update_section("b", "again", doc)
    assert doc.read_text().count("quality:b begin") == 1


def _job(name: str, scores: list[float], onset: int | None) -> list[tuple[Item, float]]:
    def label(layer: int) -> str:
        return "streak" if onset is not None and layer >= onset else "ok"

    return [
        (Item(Path(f"{name}__{k:04d}.png"), label(k), name, k, "p"), s)
        for k, s in enumerate(scores)
    ]


def test_policy_replay_counts_delay_and_false_rejects(bench):
    from inspect3d.watch.policy import PolicyConfig

    _, wp = bench
    rows = (
        _job("good", [0.1] * 10, None)
        + _job("noisy", [0.9, 0.9, 0.9] + [0.1] * 7, None)
        + _job("bad", [0.1] * 4 + [0.9] * 6, 4)
        + _job("late", [0.1] * 4 + [0.1, 0.1, 0.9, 0.9, 0.9, 0.9], 4)
        + _job("missed", [0.1] * 10, 4)
    )
    items, scores = [r[0] for r in rows], np.array([r[1] for r in rows])
    figures = wp.policy_figures(wp.replay_jobs(items, scores, 0.5, PolicyConfig()), 2)
    assert figures["n_good_jobs"] == 2 and figures["false_rejects"] == 1
    assert figures["caught"] == 2 and figures["missed"] == 1
    assert figures["within_max_delay"] == 1  # "bad": REJECT at onset + 2
    assert figures["delay_median"] == 4  # delays 2, 4 and one missed
    assert figures["delay_p90"] is None  # the missed job


def test_job_threshold_matches_the_policy(bench):
    from inspect3d.watch.policy import PolicyConfig

    _, wp = bench
    rng = np.random.default_rng(0)
    for policy in (PolicyConfig(), PolicyConfig(k=2, n=3)):
        for _ in range(20):
            rows = _job("j", list(rng.random(12)), None)
            items, scores = [r[0] for r in rows], np.array([r[1] for r in rows])
            critical = wp.job_critical_value(list(scores), policy)
            for t, rejected in ((critical, True), (np.nextafter(critical, 2.0), False)):
                row = wp.replay_jobs(items, scores, t, policy)[0]
                assert (row["reject_at"] is not None) == rejected


def test_implanted_defects_lie_inside_the_plate_and_their_masks_say_where(bench):
    """Each implanted kind changes the layer where its mask is, inside the eroded plate."""
    common, _ = bench
    import implanted

    rng = np.random.default_rng(0)
    layer = (128 + rng.normal(0, 2, (200, 240))).clip(0, 255).astype(np.uint8)
    roi = [[0.25, 0.0], [1.0, 0.0], [1.0, 1.0], [0.25, 1.0]]  # the left quarter is frame
    plate = implanted.plate_mask(roi, layer.shape)
    assert not plate[:, : 60 + implanted.EDGE].any() and plate[100, 120]
    for kind in implanted.KINDS:
        out, mask = implanted.implant(layer, kind, plate, rng)
        changed = np.abs(out.astype(int) - layer) > 0
        assert mask.any() and not (mask & ~plate).any(), kind
        assert changed[mask].mean() > 0.5, kind  # the mask marks what was drawn
        assert not changed[:, :40].any(), kind  # on the frame at most an incandescent glow's rim
    with pytest.raises(ValueError, match="scratch"):
        implanted.implant(layer, "scratch", plate, rng)


def test_implanted_report_shows_a_variant_beside_the_defaults(bench):
    import implanted

    def case(auroc: float, clean: int) -> dict:
        rate = {"k": clean, "n": 6, "rate": clean / 6, "ci95": [0.0, 0.5]}
        loc = {"pixel_auroc": auroc, "pixel_auroc_ci95": [auroc - 0.1, auroc],
               "aupro_30": 0.3, "aupro_30_ci95": [0.2, 0.4],
               "peak_on_defect": {"hits": 1, "n": 6}, "over_threshold": rate}  # fmt: skip
        return {"fit": "No_Defect 0-14", "test": "6 layers", "fit_seconds": 1.0,
                "fit_peak_rss_mb": 100.0, "size": [1024, 1024], "measured": "today",
                "clean_over_threshold": rate, "all": loc,
                **{k: loc for k in implanted.KINDS}}  # fmt: skip

    results = {"machine": "a test machine", "pblm": case(0.789, 0),
               "variants": {"normal.residual=true": {"pblm": case(0.840, 1)}}}  # fmt: skip
    text = implanted.report(results)
    defaults, variant = text.split("**Variant `normal.residual=true`**")
    assert "| all | 0.789" in defaults and "0.840" not in defaults
    assert "| all | 0.840" in variant and "1/6 over the threshold" in variant
