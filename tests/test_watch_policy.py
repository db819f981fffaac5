"""Pure parts of the watcher: the decision policy, inbox path patterns, the stability check."""

from __future__ import annotations

import os

import pytest

from inspect3d.data.layout import (
    DEFAULT_INBOX_PATTERN,
    compile_inbox_pattern,
    parse_inbox_path,
    parse_layer_name,
)
from inspect3d.errors import InspectError
from inspect3d.watch.config import WatchConfig
from inspect3d.watch.inbox import InboxScanner
from inspect3d.watch.policy import JobState, LayerObs, PolicyConfig, replay, step

T = 0.5  # threshold used below


def obs(*scores: float) -> list[LayerObs]:
    return [LayerObs(i, s, "streak" if s >= T else "ok") for i, s in enumerate(scores)]


# --- policy -----------------------------------------------------------------------------------
def test_k_of_n_rejects_at_the_kth_bad_layer_and_names_the_reason():
    state, decisions = replay(obs(0.1, 0.9, 0.2, 0.8, 0.1, 0.95), PolicyConfig(k=3, n=5), T)
    assert [d.level for d in decisions] == ["WARN", "REJECT"]
    warn, reject = decisions
    assert warn.at_layer == 1 and warn.first_bad_layer == 1
    assert reject.at_layer == 5 and reject.layers == (1, 3, 5)
    assert reject.first_bad_layer == 1 and reject.label == "streak"
    assert reject.reason()["scores"] == [0.9, 0.8, 0.95]
    assert state.level == "REJECT"


def test_bad_layers_outside_the_window_do_not_add_up():
    _, decisions = replay(
        obs(0.9, 0.1, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1, 0.9), PolicyConfig(k=2, n=3), T
    )
    assert [d.level for d in decisions] == ["WARN"]


def test_ewma_rule_rejects_a_slow_drift_below_k_of_n():
    cfg = PolicyConfig(k=5, n=5, warn_k=5, ewma_alpha=0.5, ewma_level=0.45)
    _, decisions = replay(obs(0.3, 0.4, 0.45, 0.48, 0.49, 0.49), cfg, T)
    assert [d.level for d in decisions] == ["REJECT"]
    assert decisions[0].rule.startswith("ewma")


def test_ignore_first_skips_the_first_layers_of_a_job():
    _, decisions = replay(obs(0.9, 0.9, 0.1), PolicyConfig(k=2, n=3, ignore_first=2), T)
    assert decisions == []
    _, decisions = replay(obs(0.9, 0.9, 0.1), PolicyConfig(k=2, n=3, ignore_first=0), T)
    assert [d.level for d in decisions] == ["WARN", "REJECT"]


def test_levels_never_go_down_and_each_escalation_happens_once():
    state, decisions = replay(obs(*[0.9] * 10, *[0.0] * 10), PolicyConfig(k=2, n=3), T)
    assert [d.level for d in decisions] == ["WARN", "REJECT"]
    assert state.level == "REJECT"


def test_replay_equals_stepwise_feeding():
    cfg, layers = PolicyConfig(k=2, n=4), obs(0.1, 0.7, 0.2, 0.6, 0.9)
    state, seen = JobState(), []
    for o in layers:
        state, d = step(state, o, cfg, T)
        seen += [d] if d else []
    assert (state, seen) == replay(layers, cfg, T)


@pytest.mark.parametrize(
    "kwargs", [{"k": 0}, {"k": 6, "n": 5}, {"warn_k": 4, "k": 3}, {"ewma_alpha": 0}]
)
def test_bad_policy_settings_are_refused(kwargs):
    with pytest.raises(InspectError):
        PolicyConfig(**kwargs)


def test_policy_version_changes_with_settings():
    assert PolicyConfig().version() != PolicyConfig(k=2).version()
    assert PolicyConfig().version() == PolicyConfig().version()


def test_watch_config_rejects_unknown_keys_with_the_valid_ones():
    base = {"model": "m.onnx", "inbox": "i", "state": "s"}
    with pytest.raises(InspectError, match="valid are"):
        WatchConfig.from_dict({**base, "polcy": {}})
    with pytest.raises(InspectError, match="policy"):
        WatchConfig.from_dict({**base, "policy": {"kk": 1}})
    cfg = WatchConfig.from_dict({**base, "actions": {"command": "x", "levels": ["WARN"]}})
    assert cfg.actions.command == ["x"] and cfg.actions.levels == ("WARN",)


# --- path patterns ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("p1/j1/layer_0001.png", ("p1", "j1", 1)),
        ("p1/j1/converted_ 0007.jpg", ("p1", "j1", 7)),
        ("p1/j1/job007__0012.png", ("p1", "j1", 12)),
        ("cell 2/job-9/scan.png", ("cell 2", "job-9", None)),
    ],
)
def test_default_inbox_pattern(rel, expected):
    name = parse_inbox_path(rel, compile_inbox_pattern())
    assert (name.printer, name.job, name.layer) == expected


def test_pattern_without_layer_group_numbers_by_arrival_and_misfits_are_none():
    rx = compile_inbox_pattern(r"(?P<printer>[^/]+)/(?P<job>[^/]+)/PowderRecoat_\d+_\d+\.jpg")
    assert parse_inbox_path("m1/b7/PowderRecoat_20210909_143308.jpg", rx).layer is None
    assert parse_inbox_path("m1/b7/other.jpg", rx) is None
    assert parse_inbox_path("loose.png", compile_inbox_pattern()) is None


def test_bad_patterns_are_refused_with_the_fix():
    with pytest.raises(InspectError, match="printer"):
        compile_inbox_pattern(r"(?P<job>[^/]+)/x")
    with pytest.raises(InspectError, match="regular expression"):
        compile_inbox_pattern("(")


def test_existing_layer_name_parsing_is_unchanged():
    assert DEFAULT_INBOX_PATTERN
    assert parse_layer_name("job007__0012.png").job == "job007"
    assert parse_layer_name("converted_ 0033.jpg").layer == 33


# --- stability ---------------------------------------------------------------------------------
def test_a_file_is_taken_only_once_it_stopped_changing(tmp_path):
    job = tmp_path / "p1" / "j1"
    job.mkdir(parents=True)
    f = job / "layer_0001.png"
    f.write_bytes(b"x" * 10)
    t0 = f.stat().st_mtime
    scanner = InboxScanner(tmp_path, compile_inbox_pattern(), "JOB_END", settle_s=1.0)
    assert scanner.poll(set(), now=t0 + 0.1) == []  # fresh
    assert scanner.waiting == {("p1", "j1")}
    with open(f, "ab") as fh:  # still growing
        fh.write(b"y" * 10)
    os.utime(f, (t0 + 0.5, t0 + 0.5))
    assert scanner.poll(set(), now=t0 + 0.6) == []
    assert scanner.poll(set(), now=t0 + 1.2) == []  # unchanged, but not for 1 s yet
    (arrival,) = scanner.poll(set(), now=t0 + 1.7)
    assert (arrival.printer, arrival.job, arrival.layer, arrival.size) == ("p1", "j1", 1, 20)
    assert scanner.poll({arrival.rel}, now=t0 + 2) == []  # known files are not returned again


def test_hidden_temporary_files_and_loose_files_are_ignored(tmp_path):
    job = tmp_path / "p1" / "j1"
    job.mkdir(parents=True)
    (job / ".layer_0001.png.part").write_bytes(b"x")
    (tmp_path / "p1" / "loose.png").write_bytes(b"x")
    (tmp_path / ".hidden" / "j").mkdir(parents=True)
    (tmp_path / ".hidden" / "j" / "a.png").write_bytes(b"x")
    scanner = InboxScanner(tmp_path, compile_inbox_pattern(), "JOB_END", settle_s=0)
    assert scanner.poll(set(), now=9e9) == []


def test_a_missing_inbox_is_reported_not_raised(tmp_path):
    scanner = InboxScanner(tmp_path / "gone", compile_inbox_pattern(), "JOB_END", settle_s=0)
    assert scanner.poll(set()) == []
    assert "cannot list inbox" in scanner.last_error


def test_a_reject_names_the_likeliest_defect_class_not_the_normal_arg_max():
    # over the threshold, yet 'ok' is the arg-max: the decision names the defect class
    layers = [LayerObs(i, 0.3, "ok", "streak", 0.21 + i / 100) for i in range(3)]
    _, decisions = replay(layers, PolicyConfig(k=3, n=5, warn_k=1), 0.08)
    reject = decisions[-1]
    assert reject.level == "REJECT" and reject.label == "streak"
    assert reject.reason()["class"] == "streak" and reject.reason()["class_p"] == 0.21
    assert "likeliest defect streak (p=0.21)" in reject.text() and "ok" not in reject.text()
    assert LayerObs(1, 0.3, "ok").named_class == ("ok", None)  # older rows: the label
