"""``inspect3d calibrate``: a new camera's good layers set the threshold of an exported model."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest

from inspect3d.cli import main
from inspect3d.errors import InspectError
from inspect3d.infer import OnnxModel
from inspect3d.infer.calibrate import Request, calibrate, new_threshold, with_metadata
from inspect3d.infer.calibrate import main as calibrate_main
from inspect3d.metrics import order_statistic_frr


def good_folder(holdout_dir, dst, n: int, brighter: float = 0.0):
    """``n`` good layers of the hold-out set, as another camera might see them."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted((holdout_dir / "ok").iterdir())[:n]:
        grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        shifted = np.clip(grey * (1 + brighter) + 10, 0, 255).astype(np.uint8)
        cv2.imwrite(str(dst / path.name), shifted)
    return dst


def test_new_file_has_the_threshold_its_interval_and_the_old_model_is_untouched(
    exported, holdout_dir, tmp_path
):
    good = good_folder(holdout_dir, tmp_path / "good", 10, brighter=0.2)
    before = exported.read_bytes()
    out = tmp_path / "new.onnx"
    r = calibrate(Request(exported, good, out, target_frr=0.1))
    assert exported.read_bytes() == before
    new, old = OnnxModel.load(out), OnnxModel.load(exported)
    scores = np.array([s.defect_score for _, s in new.predict_files(sorted(good.iterdir()))])
    assert new.threshold == pytest.approx(r.threshold)
    assert (scores >= new.threshold).sum() == 1  # floor(0.1 x 10) = 1 of 10 may be rejected
    assert (scores >= np.sort(scores)[-2]).sum() == 2  # and the threshold sits right above
    cal = new.meta.calibration
    assert cal["n_calibration"] == 10 and cal["expected_frr"] == pytest.approx(2 / 11)
    lo, hi = cal["frr_ci95"]
    assert 0 < lo < cal["expected_frr"] < hi < 1
    assert cal["previous_threshold"] == pytest.approx(old.threshold)
    assert new.meta.target_frr == 0.1 and new.meta.classes == old.meta.classes
    onnx.checker.check_model(onnx.load(str(out)))  # still a valid ONNX model
    x = new.pre.load(sorted(good.iterdir())[0])[None]  # same outputs: only metadata changed
    np.testing.assert_array_equal(new.run(x)[0], old.run(x)[0])


def test_metadata_editing_replaces_keys_and_keeps_others(exported):
    data = exported.read_bytes()
    edited = with_metadata(data, {"threshold": "0.25", "extra": json.dumps({"a": 1})})
    props = {p.key: p.value for p in onnx.load_from_string(edited).metadata_props}
    old = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    assert props["threshold"] == "0.25" and props["extra"] == '{"a": 1}'
    unchanged = {k: v for k, v in props.items() if k not in ("threshold", "extra")}
    assert unchanged == {k: v for k, v in old.items() if k != "threshold"}
    assert len(onnx.load_from_string(edited).metadata_props) == len(old) + 1


def test_threshold_is_an_order_statistic_and_its_rate_a_beta_law():
    scores = np.arange(1, 21) / 100.0  # 0.01 .. 0.20
    threshold, frr = new_threshold(scores, 0.05)  # 1 of 20 may be rejected
    assert 0.19 < threshold <= np.nextafter(0.19, 1) and (scores >= threshold).sum() == 1
    assert frr["expected_frr"] == pytest.approx(2 / 21)
    lo, hi = order_statistic_frr(20, 0)["frr_ci95"]  # Beta(1, 20): closed-form quantiles
    assert lo == pytest.approx(1 - 0.975 ** (1 / 20), abs=1e-6)
    assert hi == pytest.approx(1 - 0.025 ** (1 / 20), abs=1e-6)


def test_command_line_writes_the_model_and_says_what_it_did(
    exported, holdout_dir, tmp_path, capsys
):
    good = good_folder(holdout_dir, tmp_path / "good", 6)
    out = tmp_path / "cam2.onnx"
    assert main(["calibrate", f"model={exported}", f"good={good}", f"out={out}"]) == 0
    text = capsys.readouterr().out
    assert "scored 6 good layers" in text and f"wrote {out}" in text
    assert "cannot resolve" in text  # 6 layers, 5% target
    assert OnnxModel.load(out).meta.calibration["n_calibration"] == 6
    assert main(["calibrate", "model=x.onnx"]) == 2  # user errors: exit 2, message on stderr
    assert "calibrate needs good=..." in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["good=GOOD"], r"calibrate needs model=\.\.\."),
        (["model=MODEL", "good=MISSING"], r"good='.*missing' is not a folder"),
        (["model=MODEL", "good=FEW"], r"holds 4 layer image\(s\): calibrating needs at least 5"),
        (["model=CKPT", "good=GOOD"], r"model='.*checkpoint.pt' is not an ONNX model"),
        (["model=MODEL", "good=GOOD", "target_frr=5"], r"target_frr='5' is not valid"),
        (["model=MODEL", "good=GOOD", "out=MODEL"], r"is the model itself"),
        (["model=MODEL", "good=GOOD", "threshold=1"], r"unknown argument 'threshold=1'"),
    ],
)
def test_bad_input_is_named(exported, holdout_dir, tiny_run, tmp_path, args, match):
    places = {
        "MODEL": str(exported),
        "CKPT": str(tiny_run / "checkpoint.pt"),
        "GOOD": str(good_folder(holdout_dir, tmp_path / "good", 6)),
        "FEW": str(good_folder(holdout_dir, tmp_path / "few", 4)),
        "MISSING": str(tmp_path / "missing"),
    }
    args = [k + "=" + places.get(v, v) for k, v in (a.split("=") for a in args)]
    with pytest.raises(InspectError, match=match):
        calibrate_main(args)


def test_calibrate_does_not_import_torch(exported, holdout_dir, tmp_path):
    good = good_folder(holdout_dir, tmp_path / "good", 5)
    out = tmp_path / "x.onnx"
    code = (
        "import sys; from inspect3d.cli import main; "
        f"rc = main(['calibrate', 'model={exported}', 'good={good}', 'out={out}']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
