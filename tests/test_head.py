"""model.head_hidden: a hidden layer in the class head learns what a linear head cannot, is kept
by checkpoints, exports with the same numbers, and refuses a count that is not one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inspect3d.data.preprocess import Preprocess
from inspect3d.errors import InspectError
from inspect3d.models import HeadNet, ScoringNet, build_model
from inspect3d.models.checkpoint import model_from_checkpoint, save_checkpoint

PRE = Preprocess(height=64, width=64)


def cells_either_way(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of (n, 8, 4, 4) cells where a cell is a defect when its first feature is far
    from the powder's level in either direction (a streak darker or brighter than the powder):
    no single weighted sum separates both signs from the middle."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 8, 4, 4, generator=g) * 0.3
    sign = torch.randint(0, 3, (n, 1, 4, 4), generator=g) - 1  # -1 dark, 0 powder, +1 bright
    feats[:, :1] += 2.0 * sign
    return feats, (sign != 0).long()[:, 0]


def cell_accuracy(hidden: int) -> float:
    torch.manual_seed(0)
    net = build_model("smallcnn", 2, PRE, dropout=0.0, head_hidden=hidden)
    net.head.train()
    head = HeadNet(net)
    feats, labels = cells_either_way()
    # the head reads smallcnn's channels: put the 8 test features first, zeros after
    width = net.backbone.out_channels - 8
    x = torch.cat([feats, torch.zeros(feats.shape[0], width, 4, 4)], dim=1)
    opt = torch.optim.Adam(head.parameters(), lr=0.03)
    for _ in range(300):
        opt.zero_grad()
        _, logit_map = head(x)
        torch.nn.functional.cross_entropy(logit_map, labels).backward()
        opt.step()
    test, truth = cells_either_way(seed=1)
    test = torch.cat([test, torch.zeros(test.shape[0], width, 4, 4)], dim=1)
    with torch.no_grad():
        predicted = head(test)[1].argmax(1)
    return float((predicted == truth).float().mean())


def test_a_hidden_layer_learns_defects_on_both_sides_of_the_powder() -> None:
    linear, hidden = cell_accuracy(0), cell_accuracy(32)
    assert hidden > 0.97  # both signs found, the powder left
    assert linear < 0.85  # a linear head can take one side only


def test_a_checkpoint_rebuilds_the_hidden_head(tmp_path) -> None:
    net = build_model("smallcnn", 3, PRE, stride=8, head_hidden=16).eval()
    model = {"_target_": "inspect3d.models.build_model", "name": "smallcnn", "stride": 8}
    meta = {"model": {**model, "head_hidden": 16}, "classes": ["ok", "a", "b"]}
    path = save_checkpoint(tmp_path / "m.pt", net, {**meta, "preprocess": PRE.to_dict()})
    again = model_from_checkpoint(torch.load(path, weights_only=True))
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(net(x)[1], again(x)[1])
        assert again.head[0].out_channels == 16


def test_exported_graph_matches_torch(tmp_path) -> None:
    from inspect3d.export.onnx import _torch_export, verify

    pre = Preprocess(height=96, width=128)
    net = ScoringNet(build_model("smallcnn", 2, pre, stride=8, head_hidden=24)).eval()
    layers = np.random.default_rng(2).integers(0, 256, size=(2, 1, 96, 128), dtype=np.uint8)
    path = tmp_path / "hidden.onnx"
    _torch_export(net, layers, path, 18)
    verify(net, path, layers, 1e-4)  # raises when onnxruntime's numbers differ from torch's


@pytest.mark.parametrize("bad", [-1, 2.5, "wide", True])
def test_a_bad_hidden_count_is_refused(bad) -> None:
    with pytest.raises(InspectError, match=rf"model.head_hidden={bad!r} is not a channel count"):
        build_model("smallcnn", 2, PRE, head_hidden=bad)
