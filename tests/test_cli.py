"""The interface contract, run as a user would, and its errors (one clear line, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import SIZE, train_overrides


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inspect3d.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.slow
def test_contract_end_to_end(tmp_path):
    data, holdout, run = tmp_path / "synth set", tmp_path / "holdout", tmp_path / "run dir"
    small = [f"size={SIZE}", "layers_per_job=4"]
    assert cli("synth", f"out={data}", "seed=3", "n_jobs=8", *small).returncode == 0
    assert cli("synth", f"out={holdout}", "seed=4", "n_jobs=4", *small).returncode == 0
    assert (data / "manifest.csv").is_file() and (data / "ok").is_dir()

    r = cli(
        "train",
        "data=folder",
        f"data.root={data}",
        "data.normal_class=ok",
        "trainer.epochs=1",
        f"hydra.run.dir={run}",
        f"data.height={SIZE}",
        f"data.width={SIZE}",
        "trainer=fast",
        "model.width=8",
    )
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoint.pt").is_file() and (run / "train.log").is_file()

    r = cli("eval", f"run={run}", "data=folder", f"data.root={holdout}", "data.normal_class=ok")
    assert r.returncode == 0, r.stderr
    assert {"accuracy", "macro_f1", "auroc", "n"} <= set(
        json.loads((run / "eval.json").read_text())
    )

    r = cli("export", f"run={run}")
    assert r.returncode == 0, r.stderr
    assert "parity check" in r.stdout and (run / "model.onnx").is_file()

    r = cli("predict", str(run / "model.onnx"), str(holdout / "ok"), "--jsonl")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == len(list((holdout / "ok").iterdir()))
    for row in rows:
        assert {"path", "label", "probs", "defect_score", "decision"} <= set(row)
        assert sum(row["probs"].values()) == pytest.approx(1, abs=1e-4)


def test_predict_reports_a_corrupt_file_and_scores_the_rest(exported, tmp_path):
    bad, good = tmp_path / "bad layer.png", tmp_path / "good layer.png"
    bad.write_bytes(b"\x89PNG broken")
    cv2.imwrite(str(good), np.full((200, 200), 100, np.uint8))
    r = cli(
        "predict",
        str(exported),
        str(bad),
        str(good),
        "--jsonl",
        "--overlay-dir",
        str(tmp_path / "ov"),
    )
    assert r.returncode == 1
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert "cannot decode" in rows[0]["error"] and "bad layer.png" in rows[0]["error"]
    assert rows[1]["path"] == str(good) and rows[1]["decision"] in ("ok", "defect")
    assert (tmp_path / "ov" / "good layer.overlay.png").is_file()


def test_predict_readable_output(exported, holdout_dir):
    r = cli("predict", str(exported), str(holdout_dir / "ok"))
    assert r.returncode == 0 and "defect_score=" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["train", "data=folder", "data.root=/no/such/dir", "data.normal_class=OK"],
            "data root '/no/such/dir' does not exist",
        ),
        (["train", "trainer.epohcs=3"], "epohcs"),
        (["train", "model=vgg"], "vgg"),
        (["eval", "run=/no/such/run"], "checkpoint not found"),
        (["export", "run=/no/such/run"], "checkpoint not found"),
        (["predict", "/no/model.onnx", "x.png"], "model file not found"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_bad_input_gives_one_clear_error(args, message, tmp_path):
    r = cli(*args, cwd=tmp_path)
    assert r.returncode != 0
    assert message in r.stderr + r.stdout


def test_missing_normal_class(synth_dir, tmp_path):
    r = cli(
        "train",
        "data=folder",
        f"data.root={synth_dir}",
        "data.normal_class=OK",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2
    assert "normal_class 'OK' is not among the classes found" in r.stderr


def test_eval_line_has_the_localisation_figures_only_with_masks():
    from inspect3d.cli import localisation_text

    assert localisation_text({"n": 3, "auroc": 0.9}) == ""
    peak = {"hits": 7, "n": 9, "rate": 7 / 9, "ci95": [0.45, 0.94]}
    m = {"pixel_auroc": 0.91234, "aupro_30": 0.4567, "peak_on_defect": peak, "cell_auroc": 0.8}
    assert localisation_text(m) == " pixel_auroc=0.912 aupro_30=0.457 peak_on_defect=7/9"


def test_scoring_path_imports_no_torch():
    """predict, watch, status, simulate run on onnxruntime + OpenCV + numpy alone."""
    code = (
        "import sys, inspect3d.infer, inspect3d.infer.cli, inspect3d.data.preprocess, "
        "inspect3d.data.synth, inspect3d.metrics, inspect3d.watch, inspect3d.watch.cli, "
        "inspect3d.watch.status, inspect3d.watch.simulate, inspect3d.watch.actions; "
        "bad = [m for m in ('torch', 'hydra', 'torchvision') if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_multirun_sweep_writes_one_run_per_value(synth_dir, tmp_path):
    sweep = tmp_path / "sweep"
    r = cli(
        "train",
        "-m",
        "data=folder",
        f"data.root={synth_dir}",
        "data.normal_class=ok",
        f"data.height={SIZE}",
        f"data.width={SIZE}",
        "trainer=fast",
        "model.width=8",
        "trainer.epochs=1",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    )
    assert r.returncode == 0, r.stderr
    assert (sweep / "0" / "checkpoint.pt").is_file() and (sweep / "1" / "checkpoint.pt").is_file()


def test_script_and_cli_compose_the_same_config(tmp_path):
    args = ["data=pblm", "model=resnet18", "trainer.epochs=3", "--cfg", "job"]
    script = subprocess.run(
        [sys.executable, "scripts/train.py", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert script.returncode == 0, script.stderr
    assert script.stdout == cli("train", *args).stdout
    assert "name: resnet18" in script.stdout and "epochs: 3" in script.stdout


# --- each command explains itself --------------------------------------------------------------
def test_version_and_python_m():
    from importlib.metadata import version

    r = subprocess.run(
        [sys.executable, "-m", "inspect3d", "--version"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"inspect3d {version('inspect3d')}"


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["train", "trainer.epocs=3"], "did you mean 'trainer.epochs'?"),
        (["train", "-m", "trainer.epocs=1,2"], "did you mean 'trainer.epochs'?"),
        (["train", "data=folder", "data.rot=x"], "did you mean 'data.root'?"),
        (["train", "model=resnt18"], "did you mean 'resnet18'?"),
        (["synth", "out=x", "sed=1"], "did you mean 'seed'?"),
    ],
)
def test_config_typo_names_the_closest_key(args, hint, tmp_path):
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert hint in r.stderr and "Traceback" not in r.stderr and "+trainer" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "outputs").exists()  # nothing ran


@pytest.mark.slow
def test_train_results_on_stdout_logs_on_stderr(synth_dir, tmp_path):
    run = tmp_path / "run"
    r = cli("train", *train_overrides(synth_dir, "trainer.epochs=1"), f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["checkpoint", "metrics"], r.stdout
    assert "INFO" in r.stderr and (run / "train.log").read_text()


def test_failed_train_leaves_no_run_folder_and_says_it_once(synth_dir, tmp_path):
    run = tmp_path / "run"
    r = cli(*["train", "data=folder", f"data.root={synth_dir}", "data.normal_class=OK"],
            f"hydra.run.dir={run}")  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.count("normal_class 'OK' is not among the classes found") == 1, r.stderr
    assert not run.exists()
    kept = tmp_path / "kept"  # a folder with more than logs in it is not touched
    (kept / "notes.txt").parent.mkdir()
    (kept / "notes.txt").write_text("mine")
    r = cli(*["train", "data=folder", f"data.root={synth_dir}", "data.normal_class=OK"],
            f"hydra.run.dir={kept}")  # fmt: skip
    assert r.returncode == 2 and (kept / "notes.txt").is_file() and (kept / "train.log").is_file()


def two_printers(root: Path, src: Path) -> list[Path]:
    """The same layer name under two printers' job folders."""
    out = []
    for printer in ("a", "b"):
        dest = root / printer / "job1" / "layer_0001.png"
        dest.parent.mkdir(parents=True)
        dest.write_bytes(src.read_bytes())
        out.append(dest)
    return out


def test_predict_glob_jsonl_and_overlays_per_folder(exported, holdout_dir, tmp_path):
    src = sorted((holdout_dir / "ok").glob("*.png"))[0]
    layers = two_printers(tmp_path / "in", src)
    ov = tmp_path / "ov"
    r = cli("predict", str(exported), str(tmp_path / "in" / "*" / "*" / "*.png"), "--jsonl",
            "--overlay-dir", str(ov))  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]  # every stdout line is JSON
    assert [row["path"] for row in rows] == [str(p) for p in layers]
    assert sorted(row["overlay"] for row in rows) == [
        str(ov / "a" / "job1" / "layer_0001.overlay.png"),
        str(ov / "b" / "job1" / "layer_0001.overlay.png"),
    ]
    assert all(Path(row["overlay"]).is_file() for row in rows)

    r = cli("predict", str(exported), str(tmp_path / "in" / "*.tif"))
    assert r.returncode == 2 and f"glob '{tmp_path / 'in' / '*.tif'}' matches no files" in r.stderr


def test_missing_provider_is_named_with_the_choices_here(exported, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    r = cli("predict", str(exported), str(tmp_path), "--provider", "cuda")
    assert r.returncode == 2
    assert "provider 'cuda' is not available" in r.stderr
    assert "available here: auto, cpu" in r.stderr
    assert "cannot load" not in r.stderr and "provider=" not in r.stderr
