"""Every config group composes and instantiates; typos fail at composition."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from inspect3d.config import CONFIG_DIR
from inspect3d.data.sources import preprocess_of
from inspect3d.models.checkpoint import model_from_config
from inspect3d.train.freeze import optimizer_factory

from conftest import compose


def group(name: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / name).glob("*.yaml"))


def test_groups_exist():
    for name in ("data", "model", "optim", "trainer", "experiment"):
        assert group(name), f"configs/{name}/ is empty"


@pytest.mark.parametrize("data", group("data"))
def test_every_data_config_composes(data):
    cfg = compose("train", [f"data={data}", "data.root=/somewhere", "data.normal_class=ok"])
    assert cfg.data.kind in ("folder", "manifest", "synth")
    pre = preprocess_of(cfg.data, [])  # no layers to look at: channels unset means grey
    assert pre.channels in (1, 3)


@pytest.mark.parametrize("model", group("model"))
def test_every_model_config_instantiates(model):
    cfg = compose("train", [f"model={model}"])
    net = model_from_config(OmegaConf.to_container(cfg.model), 3, preprocess_of(cfg.data, []))
    assert isinstance(net, torch.nn.Module)


@pytest.mark.parametrize("optim", group("optim"))
def test_every_optimiser_config_instantiates(optim):
    cfg = compose("train", [f"optim={optim}"])
    ctor, backbone_lr_scale = optimizer_factory(cfg.optim)
    opt = ctor([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.Optimizer) and backbone_lr_scale >= 0


@pytest.mark.parametrize("trainer", group("trainer"))
def test_every_trainer_config_composes(trainer):
    assert compose("train", [f"trainer={trainer}"]).trainer.epochs >= 1


@pytest.mark.parametrize("experiment", group("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose("train", [f"experiment={experiment}"])
    assert cfg.trainer.epochs >= 1


@pytest.mark.parametrize("name", ["eval", "export", "synth"])
def test_other_commands_compose(name):
    assert compose(name, ["run=/r", "out=/o"] if name != "synth" else ["out=/o"])


@pytest.mark.parametrize(
    "override",
    ["trainer.epoch=3", "data.rooot=/x", "model.widht=8", "trainer.epochs=many", "data=nosuch"],
)
def test_typos_fail_when_composing(override):
    with pytest.raises((ConfigCompositionException, Exception)) as info:
        compose("train", [override])
    bad = override.split("=")[0].split(".")[-1] if "nosuch" not in override else "nosuch"
    assert bad in str(info.value) or "many" in str(info.value)
