"""Pretrained backbones: a frozen probe (model.freeze); head first, then all (freeze_epochs)."""

from __future__ import annotations

import pytest
import torch

from inspect3d.data.preprocess import Preprocess
from inspect3d.errors import InspectError
from inspect3d.models import build_model
from inspect3d.models.checkpoint import load_checkpoint
from inspect3d.train.augment import AugmentSettings
from inspect3d.train.dataset import LayerDataset
from inspect3d.train.freeze import Views, feature_dataset, freeze_plan, make_optimizer
from inspect3d.train.run import train

from conftest import compose, train_overrides
from isolate import isolated

LITE = ["model=efficientnet_lite0"]


def lite_overrides(synth_dir, *extra: str) -> list[str]:
    return [o for o in train_overrides(synth_dir, *LITE, *extra) if not o.startswith("model.width")]


def pretrained_state() -> dict[str, torch.Tensor]:
    net = build_model("efficientnet_lite0", 2, Preprocess(height=128, width=128), pretrained=True)
    return {k: v.clone() for k, v in net.state_dict().items() if k.startswith("backbone.")}


def test_probe_trains_the_head_only_and_keeps_pretrained_statistics(synth_dir, tmp_path):
    cfg = compose(
        "train",
        lite_overrides(
            synth_dir, "model.freeze=true", "trainer.epochs=6", "trainer.max_steps_per_epoch=null"
        ),
    )
    metrics, path = isolated(train, cfg, tmp_path / "probe")
    ckpt = load_checkpoint(path)
    before = pretrained_state()
    assert before, "no backbone keys"
    for key, value in before.items():  # weights and BatchNorm running statistics
        assert torch.equal(ckpt["state_dict"][key], value), key
    losses = [h["train_loss"] for h in ckpt["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0]  # the head learns
    assert metrics["n"] > 0 and 0.0 <= ckpt["threshold"] <= 1.0


def test_head_first_then_whole_net_at_the_scaled_rate(synth_dir, tmp_path):
    # lr x 0 for the backbone: after the head-only epoch it may train but must not move
    frozen = lite_overrides(synth_dir, "model.freeze_epochs=1", "optim.backbone_lr_scale=0.0")
    isolated(train, compose("train", frozen), tmp_path / "zero")
    state = load_checkpoint(tmp_path / "zero" / "last.pt")
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    before = pretrained_state()
    convs = [k for k in before if k.endswith("conv.weight")]
    assert all(torch.equal(state["state_dict"][k], before[k]) for k in convs)
    moving = lite_overrides(synth_dir, "model.freeze_epochs=1", "optim.backbone_lr_scale=1.0")
    isolated(train, compose("train", moving), tmp_path / "one")
    trained = load_checkpoint(tmp_path / "one" / "last.pt")["state_dict"]
    assert any(not torch.equal(trained[k], before[k]) for k in convs)


def test_frozen_backbone_stays_in_eval_mode_without_gradients():
    net = build_model("efficientnet_lite0", 2, Preprocess(height=64, width=64), pretrained=True)
    net.freeze_backbone(True)
    net.train()
    assert not net.backbone.training and net.head.training
    assert not any(p.requires_grad for p in net.backbone.parameters())
    net.freeze_backbone(False)
    assert net.backbone.training and all(p.requires_grad for p in net.backbone.parameters())


def test_backbone_gets_its_own_learning_rate():
    net = build_model("efficientnet_lite0", 2, Preprocess(height=64, width=64), pretrained=False)
    cfg = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "backbone_lr_scale": 0.1}
    opt = make_optimizer(cfg, net, 0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(net.parameters()))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (
            {"name": "smallcnn", "freeze": True},
            r"model.freeze=true needs a pretrained backbone.*'smallcnn' has none",
        ),
        (
            {"name": "efficientnet_lite0", "pretrained": False, "freeze_epochs": 2},
            r"model.freeze_epochs=2 needs a pretrained backbone.*model.pretrained=false",
        ),
        (
            {"name": "efficientnet_lite0", "pretrained": True, "freeze_epochs": 5},
            r"model.freeze_epochs=5 is not valid with trainer.epochs=5: use 0..4",
        ),
        (
            {"name": "efficientnet_lite0", "pretrained": True, "freeze": True, "freeze_epochs": 1},
            r"freeze_epochs=1 does not apply",
        ),
        (
            {"name": "efficientnet_lite0", "pretrained": True, "freeze": True, "probe_views": 0},
            r"model.probe_views=0 is not valid: use an integer >= 1",
        ),
        (
            {"name": "efficientnet_lite0", "pretrained": True, "probe_views": 4},
            r"model.probe_views=4 applies to a probe \(model.freeze=true\)",
        ),
    ],
)
def test_bad_freeze_settings_are_named(model, match):
    with pytest.raises(InspectError, match=match):
        freeze_plan(model, {"lr": 1e-3}, epochs=5)


def test_freeze_without_pretrained_backbone_fails_before_loading_data(tmp_path):
    overrides = train_overrides(tmp_path / "missing", "model.freeze=true")
    with pytest.raises(InspectError, match="'smallcnn' has none"):
        isolated(train, compose("train", overrides), tmp_path / "run")


def test_stride8_probe_trains_exports_and_maps_every_8_pixels(synth_dir, tmp_path):
    from inspect3d.export.onnx import export_run
    from inspect3d.infer.model import OnnxModel

    s8 = train_overrides(synth_dir, "model=efficientnet_lite0_s8", "trainer.epochs=3")
    cfg = compose("train", [o for o in s8 if not o.startswith("model.width")])
    _, path = isolated(train, cfg, tmp_path / "s8")
    ckpt = load_checkpoint(path)
    assert ckpt["config"]["model"]["freeze"] is True  # the probe by default: head only
    losses = [h["train_loss"] for h in ckpt["history"]]
    assert losses[-1] < losses[0]
    isolated(export_run, compose("export", [f"run={tmp_path / 's8'}"]))
    model = OnnxModel.load(tmp_path / "s8" / "model.onnx")
    assert model.meta.defect_map_stride == 8
    layer = next((synth_dir / "ok").glob("*.png"))
    score = model.predict(layer)
    size = model.meta.preprocess.height
    assert score.defect_map.shape[-2:] == (size // 8, size // 8)


def test_probe_views_add_augmented_copies_of_the_training_layers_with_their_masks():
    net = build_model("efficientnet_lite0", 2, Preprocess(height=64, width=64), pretrained=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (3, 1, 64, 64), generator=g, dtype=torch.uint8).numpy()
    masks = (
        torch.zeros(3, 1, 16, 16, dtype=torch.uint8).numpy(),
        torch.ones(3, dtype=bool).numpy(),
    )
    masks[0][1, 0, 4:8, 4:8] = 1
    layers = LayerDataset(images, [0, 1, 0], masks)
    views = Views(3, AugmentSettings(p=1.0, scale=0.2, rotate=10.0), g)
    feats = feature_dataset(net, layers, torch.device("cpu"), False, views)
    plain = feature_dataset(net, layers, torch.device("cpu"), False)
    assert len(feats) == 9 and len(plain) == 3
    assert feats.labels.tolist() == [0, 1, 0] * 3 and bool(feats.known.all())
    assert torch.equal(feats.images[:3], plain.images)  # view 0: the layers as they are
    assert not torch.equal(feats.images[3:6], plain.images)  # the others augmented
    assert feats.masks.shape == (9, 1, 16, 16) and int(feats.masks[1].sum()) == 16
    assert int(feats.masks[4].sum()) > 0  # the defect's mask moved with its layer


def test_the_demos_experiment_trains_a_hidden_head_keeps_the_last_epoch_and_exports(
    synth_dir, tmp_path
):
    from inspect3d.export.onnx import export_run
    from inspect3d.infer import OnnxModel

    overrides = lite_overrides(synth_dir, "experiment=probe_s8", "trainer.epochs=3")
    run = tmp_path / "s8"
    metrics, path = isolated(train, compose("train", overrides), run)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 == metrics["best_epoch"] and metrics["keep"] == "last"
    assert ckpt["model"]["head_hidden"] == 64
    isolated(export_run, compose("export", [f"run={run}"]))  # fails unless ONNX matches torch
    assert OnnxModel.load(run / "model.onnx").meta.classes == ckpt["classes"]
