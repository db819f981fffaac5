"""train -> checkpoint -> eval -> export -> onnxruntime, on a tiny synthetic run."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch

from inspect3d.data.manifest import scan_folder
from inspect3d.errors import InspectError
from inspect3d.infer import OnnxModel
from inspect3d.infer.cpu import int8_class
from inspect3d.infer.int8 import int8_verdict
from inspect3d.infer.metadata import ModelMeta
from inspect3d.infer.providers import choose_runtime
from inspect3d.models import ScoringNet
from inspect3d.models.checkpoint import load_checkpoint, model_from_checkpoint
from inspect3d.train.run import train

from conftest import compose, train_overrides
from isolate import isolated


def test_run_folder_holds_everything(tiny_run):
    for name in ("checkpoint.pt", "last.pt", "metrics.json", "curves.png", "confusion.png"):
        assert (tiny_run / name).stat().st_size > 0, name
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "auroc", "n", "confusion_matrix", "per_class"} <= set(metrics)
    assert not list(tiny_run.glob(".*.tmp")), "half-written files left behind"


def test_checkpoint_is_self_describing_and_weights_only(tiny_run):
    ckpt = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    assert ckpt["classes"][0] == ckpt["normal_class"] == "ok"
    assert ckpt["preprocess"]["height"] == 128 and ckpt["config"]["data"]["root"]
    assert 0 <= ckpt["threshold"] <= 1.0 + 1e-9
    model_from_checkpoint(ckpt)  # rebuilds with no config but the checkpoint


def test_training_is_reproducible_on_cpu(synth_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        isolated(
            train, compose("train", train_overrides(synth_dir, "trainer.epochs=1")), tmp_path / name
        )
        runs.append(load_checkpoint(tmp_path / name / "last.pt")["state_dict"])
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key


def test_resume_continues_from_last_epoch(synth_dir, tmp_path):
    first = tmp_path / "first"
    isolated(train, compose("train", train_overrides(synth_dir, "trainer.epochs=1")), first)
    resumed = tmp_path / "resumed"
    isolated(
        train,
        compose(
            "train",
            train_overrides(synth_dir, "trainer.epochs=2", f"trainer.resume={first / 'last.pt'}"),
        ),
        resumed,
    )
    history = load_checkpoint(resumed / "last.pt")["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_resume_from_another_model_is_refused(synth_dir, tiny_run, tmp_path):
    overrides = train_overrides(
        synth_dir, "model=mobilenet_v3_small", f"trainer.resume={tiny_run / 'last.pt'}"
    )
    cfg = compose("train", [o for o in overrides if not o.startswith("model.width")])
    with pytest.raises(InspectError, match="checkpoint holds model 'smallcnn'"):
        isolated(train, cfg, tmp_path / "other")


def test_eval_on_held_out_data_writes_eval_json(tiny_run, holdout_dir, tmp_path):
    from inspect3d.train.evaluate import evaluate_run

    out = tmp_path / "eval.json"
    cfg = compose(
        "eval",
        [
            f"run={tiny_run}",
            "data=folder",
            f"data.root={holdout_dir}",
            "data.normal_class=ok",
            f"out={out}",
        ],
    )
    metrics = isolated(evaluate_run, cfg)
    saved = json.loads(out.read_text())
    assert saved["n"] == len(scan_folder(holdout_dir)) == metrics["n"]
    assert {"accuracy", "macro_f1", "auroc", "threshold", "per_class"} <= set(saved)


def test_eval_without_data_uses_the_runs_validation_split(tiny_run, tmp_path):
    from inspect3d.train.evaluate import evaluate_run

    metrics = isolated(
        evaluate_run, compose("eval", [f"run={tiny_run}", f"out={tmp_path / 'v.json'}"])
    )
    trained = load_checkpoint(tiny_run / "checkpoint.pt")["metrics"]
    assert metrics["source"].startswith("validation split")
    assert metrics["n"] == trained["n"]
    assert metrics["macro_f1"] == pytest.approx(trained["macro_f1"])


def test_eval_refuses_a_class_the_model_does_not_know(tiny_run, holdout_dir, tmp_path):
    from inspect3d.train.evaluate import evaluate_run

    (holdout_dir.parent / "renamed").mkdir(exist_ok=True)
    extra = holdout_dir.parent / "renamed"
    (extra / "ok").mkdir(exist_ok=True)
    (extra / "crack").mkdir(exist_ok=True)
    first = sorted((holdout_dir / "ok").iterdir())[0]
    for d in ("ok", "crack"):
        (extra / d / first.name).write_bytes(first.read_bytes())
    cfg = compose(
        "eval",
        [
            f"run={tiny_run}",
            "data=folder",
            f"data.root={extra}",
            "data.normal_class=ok",
            f"out={tmp_path / 'e.json'}",
        ],
    )
    with pytest.raises(InspectError, match=r"classes \['crack'\].*unknown to the model"):
        isolated(evaluate_run, cfg)


def test_onnx_matches_torch_and_carries_metadata(exported, tiny_run, holdout_dir):
    ckpt = load_checkpoint(tiny_run / "checkpoint.pt")
    props = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    meta = ModelMeta.from_props(props)
    assert meta.classes == ckpt["classes"] and meta.threshold == pytest.approx(ckpt["threshold"])
    assert meta.preprocess.to_dict() == ckpt["preprocess"]
    assert meta.config_hash == ckpt["config_hash"] and meta.inspect3d_version
    assert onnx.load(str(exported)).opset_import[0].version >= 17

    model = OnnxModel.load(exported)
    paths = sorted(p for p in holdout_dir.rglob("*.png") if "_masks" not in p.parts)[:5]
    scores = model.predict_batch(paths)
    assert meta.defect_map_stride * scores[0].defect_map.shape[0] == meta.preprocess.height
    net = ScoringNet(model_from_checkpoint(ckpt)).eval()
    with torch.inference_mode():
        probs, maps = net(torch.from_numpy(np.stack([model.pre.load(p) for p in paths])))
    for s, p, m in zip(scores, probs.numpy(), maps.numpy(), strict=True):
        np.testing.assert_allclose(list(s.probs.values()), p, atol=1e-5)
        np.testing.assert_allclose(s.defect_map, m[0], atol=1e-5)
        assert s.decision == ("defect" if s.defect_score >= meta.threshold else "ok")


def test_onnx_batch_is_dynamic(exported):
    model = OnnxModel.load(exported)
    for n in (1, 3, 7):
        probs, maps = model.run(np.zeros((n, 1, 128, 128), np.uint8))
        assert probs.shape[0] == maps.shape[0] == n


def test_export_parity_failure_leaves_no_model(tiny_run, tmp_path):
    from inspect3d.export.onnx import export_run

    out = tmp_path / "strict.onnx"
    with pytest.raises(InspectError, match="parity check FAILED"):
        export_run(compose("export", [f"run={tiny_run}", f"out={out}", "tolerance=-1"]))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_onnx_without_inspect3d_metadata_is_refused(exported, tmp_path):
    bare = onnx.load(str(exported))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(InspectError, match="no inspect3d metadata"):
        OnnxModel.load(tmp_path / "bare.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(InspectError, match="cannot load"):
        OnnxModel.load(tmp_path / "junk.onnx")


def test_missing_gpu_provider_is_an_error_not_a_fallback(exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(InspectError, match=r"provider 'cuda'.*not available"):
        OnnxModel.load(exported, provider="cuda")


def test_threshold_override(exported):
    model = OnnxModel.load(exported, threshold=0.0)
    assert model.predict(np.zeros((64, 64), np.uint8)).decision == "defect"
    model = OnnxModel.load(exported, threshold=1.01)
    assert model.predict(np.zeros((64, 64), np.uint8)).decision == "ok"


def test_int8_quantisation_writes_a_checked_model(tiny_run, tmp_path, caplog):
    from inspect3d.export.onnx import export_run

    caplog.set_level(logging.INFO, logger="inspect3d.results")
    out = tmp_path / "m.onnx"
    paths = export_run(
        compose("export", [f"run={tiny_run}", f"out={out}", "quantize=int8", "n_calib=4"])
    )
    assert paths == [out, tmp_path / "m.int8.onnx"]
    assert "int8 check" in caplog.text
    props = {p.key: p.value for p in onnx.load(str(paths[1])).metadata_props}
    assert props["quantization"] == "int8-qdq-static" and "int8_speed" in props
    pays, _ = int8_verdict(json.loads(props["int8_speed"]), choose_runtime("auto"), int8_class())
    model = OnnxModel.load(paths[1])  # int8 only where it was measured to pay, else m.onnx
    assert model.path == str(paths[1] if pays else paths[0])
    ops = {n.op_type for n in onnx.load(str(paths[1])).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_map_loss_needs_a_defect_layer_with_a_mask():
    from inspect3d.train.dataset import LayerDataset
    from inspect3d.train.run import map_loss_weight

    images, masks = np.zeros((3, 1, 32, 32), np.uint8), np.zeros((3, 1, 8, 8), np.uint8)
    only_normal = LayerDataset(images, [0, 1, 1], (masks, np.array([True, False, False])))
    assert map_loss_weight(only_normal, 1.0) == 0.0  # one-sided: it would favour normal
    with_defect = LayerDataset(images, [0, 1, 1], (masks, np.array([True, True, False])))
    assert map_loss_weight(with_defect, 0.5) == 0.5


@pytest.mark.parametrize("keep", ["best", "last"])
def test_the_run_keeps_the_epoch_trainer_keep_names(synth_dir, tmp_path, keep):
    cfg = compose("train", train_overrides(synth_dir, "trainer.epochs=4", f"trainer.keep={keep}"))
    metrics, path = isolated(train, cfg, tmp_path / keep)
    kept, last = load_checkpoint(path), load_checkpoint(tmp_path / keep / "last.pt")
    scores = [(h["val_macro_f1"], -h["val_loss"]) for h in last["history"]]
    want = 4 if keep == "last" else 1 + scores.index(max(scores))  # first of equal bests
    assert kept["epoch"] == metrics["best_epoch"] == want and metrics["keep"] == keep
    if keep == "last":
        for key, value in last["state_dict"].items():
            assert torch.equal(kept["state_dict"][key], value), key


@pytest.mark.parametrize("keep", ["final", "Best", "3"])
def test_an_unknown_trainer_keep_is_refused(synth_dir, tmp_path, keep):
    cfg = compose("train", train_overrides(synth_dir, f"trainer.keep={keep}"))
    with pytest.raises(InspectError, match=f"trainer.keep='{keep}' is not valid: use best"):
        isolated(train, cfg, tmp_path / "bad")
