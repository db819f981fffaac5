"""The ``inspect3d`` command: one entry point, one sub-command per stage of the flow.

synth, train, fit-normal, eval and export take Hydra overrides (``key=value``; train also
``-m`` sweeps); predict, fetch and status take ordinary options; calibrate takes plain
``key=value`` arguments; watch, simulate, report, review and dataset take ``key=value``
overrides merged with OmegaConf (``model`` and ``data`` are Hydra config groups here). Only
train/fit-normal/eval/export import torch.

Exit codes, alike for every command: 0 done; 1 done, but some inputs failed (layers predict
could not score, files ``fetch --verify-only`` found wrong); 2 a usage or input error (an
``InspectError``: one line ``error: ...`` on stderr, no traceback). The library raises, logs or
returns; only the commands print.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable

from inspect3d import __version__
from inspect3d.errors import InspectError

log = logging.getLogger("inspect3d")

USAGE = """usage: inspect3d COMMAND [ARGS...]   (inspect3d --version: the installed version)

commands (the flow: synth/fetch -> train -> eval -> export -> predict):
  synth    out=DIR seed=S [n_jobs=N ...]        write synthetic powder-bed jobs
  fetch    NAME [--dest DIR]                    download a public data set (pblm, snu_fdm)
  train    [data=folder data.root=DIR data.normal_class=NAME ...]   train (Hydra overrides, -m)
  fit-normal data=folder data.root=DIR data.normal_class=NAME   model from good layers only
  eval     run=RUN [data=... ]                  evaluate a run; writes RUN/eval.json
  export   run=RUN [quantize=int8]              write RUN/model.onnx and check it against torch
  predict  MODEL.onnx PATH... [--jsonl]         score layer images with onnxruntime
  calibrate model=MODEL.onnx good=DIR [out=NEW.onnx]   threshold set on a new camera's good layers
  simulate data=DIR inbox=INBOX printers=N rate=R   replay jobs into an inbox like printers do
  watch    model=MODEL.onnx inbox=INBOX state=STATE  score layers as they land, decide per job
  status   state=STATE|db=URL [--json] [--jobs] the watcher's (or plant's) printers, health
  report   state=STATE out=DIR                  HTML shop summary + one page per job
  review   state=STATE [port=P]                 local review page for QA (127.0.0.1)
  dataset  from-reviews state=STATE out=FILE.csv   reviewed layers as a training manifest
  db       upgrade|copy db=URL [state=STATE cell=NAME]   a plant's PostgreSQL history

Run `inspect3d COMMAND --help` for the options of one command.
"""


def synth_task(cfg) -> None:
    from inspect3d.data.synth import SynthConfig, generate

    fields = SynthConfig.__dataclass_fields__
    items = generate(cfg.out, SynthConfig(**{k: cfg[k] for k in fields if k in cfg}))
    labels = sorted({it.label for it in items})
    print(f"wrote {len(items)} layers of {cfg.n_jobs} jobs ({', '.join(labels)}) to {cfg.out}")


def train_task(cfg) -> float:
    from hydra.core.hydra_config import HydraConfig

    from inspect3d.train.run import discard_failed_run, train

    out_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics, path = train(cfg, out_dir)
    except BaseException:
        discard_failed_run(out_dir)
        raise
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return float(metrics["macro_f1"])
    print(
        f"checkpoint: {path}\nmetrics:    {out_dir}/metrics.json "
        f"(val macro-F1 {metrics['macro_f1']:.3f}, N={metrics['n']})"
    )
    return float(metrics["macro_f1"])  # the value a Hydra sweeper optimises


def fit_normal_task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from inspect3d.normal.fit import fit_normal

    out_dir = HydraConfig.get().runtime.output_dir
    summary, path = fit_normal(cfg, out_dir)
    print(f"checkpoint: {path}\n{summary}")


def eval_task(cfg) -> None:
    from inspect3d.train.evaluate import evaluate_run

    m = evaluate_run(cfg)
    print(
        f"eval: N={m['n']} accuracy={m['accuracy']:.3f} macro_f1={m['macro_f1']:.3f} "
        f"auroc={_rounded(m['auroc'])}{localisation_text(m)} -> {cfg.out}"
    )


def localisation_text(m: dict) -> str:
    """`` pixel_auroc=… aupro_30=… peak_on_defect=k/N`` when eval had masks, else ''."""
    if "pixel_auroc" not in m:
        return ""
    peak = m["peak_on_defect"]
    return (
        f" pixel_auroc={_rounded(m['pixel_auroc'])} aupro_30={_rounded(m['aupro_30'])}"
        f" peak_on_defect={peak['hits']}/{peak['n']}"
    )


def _rounded(value: float | None) -> float | None:
    return value if value is None else round(value, 3)


def export_task(cfg) -> None:
    from inspect3d.export.onnx import export_run
    from inspect3d.results import to_stdout

    with to_stdout():  # the parity (and int8) checks
        paths = export_run(cfg)
    for path in paths:
        print(f"wrote {path}")


HYDRA_TASKS: dict[str, Callable] = {
    "synth": synth_task,
    "train": train_task,
    "fit-normal": fit_normal_task,
    "eval": eval_task,
    "export": export_task,
}


# Commands that import torch: without the training extra they say so in one line.
TORCH_COMMANDS = ("train", "fit-normal", "eval", "export")
SWEEP_FLAGS = ("-m", "--multirun")


def require_torch(command: str) -> None:
    if importlib.util.find_spec("torch") is None:
        raise InspectError(
            f'inspect3d {command} needs the training extra: pip install "inspect3d[train]"'
        )


def run_hydra(command: str, args: list[str]) -> int:
    """Run a Hydra task with ``args`` as its command line; user errors exit 2, no traceback."""
    import hydra

    from inspect3d.config import CONFIG_DIR

    task = HYDRA_TASKS[command]
    result: dict[str, int] = {"rc": 0}

    name = command.replace("-", "_")  # fit-normal -> configs/fit_normal.yaml
    check_overrides(command, name, args)

    @hydra.main(config_path=str(CONFIG_DIR), config_name=name, version_base="1.3")
    def entry(cfg):
        try:
            return task(cfg)
        except InspectError as exc:
            _log_to_files(f"error: {exc}")  # the run's log file; the console gets it once, below
            print(f"error: {exc}", file=sys.stderr)
            result["rc"] = 2
            if any(a in SWEEP_FLAGS for a in args):
                raise
            return None

    sys.argv = [f"inspect3d {command}", *args]
    entry()
    return result["rc"]


def _log_to_files(message: str) -> None:
    """``message`` into the log files of the run (Hydra's file handler), not on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


# --- config typos: one line naming the closest key, before Hydra prints its traceback ----------
def check_overrides(command: str, name: str, args: list[str]) -> None:
    """Compose ``configs/<name>.yaml`` with ``args`` once; a Hydra error becomes an InspectError.

    Hydra's own flags (``--cfg``, ``--help``, ...) are left to Hydra. In a sweep (``-m``) each
    swept key is checked with its first value.
    """
    from hydra.errors import HydraException

    if any(a.startswith("-") and a not in SWEEP_FLAGS for a in args):
        return
    overrides = [a for a in args if a not in SWEEP_FLAGS]
    try:
        overrides = _first_of_sweeps(overrides)
        _compose(name, overrides)
    except HydraException as exc:
        msg = _explain(exc, command, _valid_keys(name, overrides))
        raise InspectError(f"`inspect3d {command}`: {msg}") from None


def _compose(name: str, overrides: list[str]):
    from inspect3d.config import compose

    return compose(name, overrides)


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        if o.is_sweep_override()
        else text
        for o, text in zip(parsed, overrides, strict=True)
    ]


def _valid_keys(name: str, overrides: list[str]) -> list[str]:
    """The keys of the config with the user's group choices (``data=folder``) where they compose."""
    from hydra.errors import HydraException

    from inspect3d.overrides import flat_keys

    groups = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0]]
    for choice in (groups, []):
        try:
            return flat_keys(_compose(name, choice))
        except HydraException:
            continue
    return []


def _explain(exc: Exception, command: str, valid: list[str]) -> str:
    """Hydra's message, shortened, with the closest key or option for a typo."""
    from hydra.errors import OverrideParseException

    from inspect3d.overrides import did_you_mean

    text = str(exc)
    if isinstance(exc, OverrideParseException):
        return f"{text.splitlines()[0]}: use key=value (Hydra's override syntax)"
    key = re.search(r"Could not override '([^']+)'", text)
    if key:
        near = did_you_mean(key.group(1), valid)
        return f"no config key {key.group(1)!r}{near}; all keys: `inspect3d {command} --cfg job`"
    group = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if group:
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], re.MULTILINE)
        near = did_you_mean(group.group(2), options)  # Hydra lists the group's options
        return f"no option {group.group(2)!r} in {group.group(1)!r}{near}: use one of {options}"
    cause = f": {str(exc.__cause__).splitlines()[0]}" if exc.__cause__ else ""
    return text.splitlines()[0] + cause


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"inspect3d {__version__}")
        return 0
    command, args = argv[0], argv[1:]
    try:
        if command in TORCH_COMMANDS:
            require_torch(command)
        if command in HYDRA_TASKS:
            return run_hydra(command, args)
        if command == "predict":
            from inspect3d.infer.cli import main as predict_main

            return predict_main(args)
        if command == "calibrate":  # key=value, onnxruntime only (see infer/calibrate.py)
            from inspect3d.infer.calibrate import main as calibrate_main

            return calibrate_main(args)
        if command in ("watch", "simulate"):  # key=value read by OmegaConf (see watch/cli.py)
            from inspect3d.watch import cli as watch_cli

            return watch_cli.main(command, args)
        if command == "status":
            from inspect3d.watch.status import main as status_main

            return status_main(args)
        if command in ("report", "review", "dataset"):  # key=value (see review/cli.py)
            from inspect3d.review import cli as review_cli

            return review_cli.main(command, args)
        if command == "db":  # key=value (see watch/db.py)
            from inspect3d.watch.db import main as db_main

            return db_main(args)
        if command == "fetch":
            from inspect3d.data.fetch import main as fetch_main

            return fetch_main(args)
    except InspectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `inspect3d predict ... | head`
        sys.stderr.close()
        return 0
    print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
