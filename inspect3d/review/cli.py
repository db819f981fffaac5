"""``inspect3d report|review|dataset``: ``key=value`` arguments over ``configs/review.yaml``.

Each command reads its own section of the file; unknown keys and missing values are errors that
name the valid keys, like ``inspect3d watch``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from inspect3d.errors import InspectError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "review.yaml"
USAGE = {
    "report": "inspect3d report state=STATE|db=URL [cell=NAME] out=DIR",
    "review": "inspect3d review state=STATE|db=URL [cell=NAME port=P host=H token=T reviewer=NAME]",
    "dataset": "inspect3d dataset from-reviews state=STATE|db=URL [cell=NAME] out=FILE.csv "
    "[normal_class=NAME]",
}


def load_section(section: str, args: list[str]) -> dict:
    """The ``section`` of configs/review.yaml with ``key=value`` overrides, as plain values."""
    from omegaconf import OmegaConf

    from inspect3d.overrides import merge_overrides

    return merge_overrides(OmegaConf.load(CONFIG)[section], args, section, USAGE[section])


def report_main(args: list[str]) -> int:
    from inspect3d.review.report import build_report

    index = build_report(**load_section("report", args))
    print(f"wrote {index} (open it in a browser; one page per job in {index.parent / 'jobs'})")
    return 0


def review_main(args: list[str]) -> int:
    from inspect3d.review.server import open_server, ready_line, serve

    cfg = load_section("review", args)
    if not isinstance(cfg["port"], int) or not 0 <= cfg["port"] <= 65535:
        raise InspectError(f"port={cfg['port']!r} is not valid: use 1..65535 (0: any free port)")
    server = open_server(**cfg)
    print(ready_line(server), flush=True)
    serve(server)
    return 0


def dataset_main(args: list[str]) -> int:
    from inspect3d.review.dataset import export_reviews

    if not args or args[0] != "from-reviews":
        got = repr(args[0]) if args else "nothing"
        raise InspectError(f"unknown dataset command {got}: use `{USAGE['dataset']}`")
    print(export_reviews(**load_section("dataset", args[1:])))
    return 0


def reason_codes() -> str:
    """The fixed decisions and reason codes, as QA sees them in the page."""
    from inspect3d.review.decisions import DECISIONS, REASONS

    lines = ["decisions and reason codes (keys 1/2/3 in the page):"]
    for decision, codes in REASONS.items():
        lines.append(f"  {decision} ({DECISIONS[decision]}):")
        lines += [f"    {code:<16} {text}" for code, text in codes]
    return "\n".join(lines)


def main(command: str, args: list[str]) -> int:
    """Entry for ``inspect3d report|review|dataset``; ``--help`` prints usage and settings."""
    if "-h" in args or "--help" in args:
        print(f"usage: {USAGE[command]}\n\n{CONFIG.read_text()}")
        if command == "review":
            print(reason_codes())
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return {"report": report_main, "review": review_main, "dataset": dataset_main}[command](args)
