"""``inspect3d watch`` and ``inspect3d simulate``: ``key=value`` overrides of a YAML config.

The overrides look like Hydra's, but are merged with OmegaConf directly: ``model`` and ``data``
(keys of the stable interface) are also Hydra config groups in ``configs/``, which Hydra would
take for group choices. Nested keys work (``policy.k=2``), unknown keys are errors.
"""

from __future__ import annotations

import logging
import sys


def load_config(name: str, args: list[str]) -> dict:
    """``configs/<name>.yaml`` with ``key=value`` overrides, resolved to plain Python values."""
    from omegaconf import OmegaConf

    from inspect3d.config import CONFIG_DIR
    from inspect3d.overrides import merge_overrides

    return merge_overrides(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"), args, name)


def watch_main(args: list[str]) -> int:
    from inspect3d.watch.config import WatchConfig
    from inspect3d.watch.service import watch
    from inspect3d.watch.status import format_jobs, format_text, jobs

    cfg = WatchConfig.from_dict(load_config("watch", args))
    s = watch(cfg)
    print(format_text(s))
    print(format_jobs(jobs(cfg.state, cfg.db, cfg.cell if cfg.db else None)))
    return 0


def simulate_main(args: list[str]) -> int:
    from inspect3d.watch.simulate import simulate

    for job in simulate(**load_config("simulate", args)):
        first = job.first_defect_layer
        print(f"{job.printer} {job.name}: {len(job.layers)} layers, first defect layer {first}")
    return 0


def main(command: str, args: list[str]) -> int:
    """Entry for ``inspect3d watch|simulate``; ``--help`` prints the config with its comments."""
    if "-h" in args or "--help" in args:
        from inspect3d.config import CONFIG_DIR

        print((CONFIG_DIR / f"{command}.yaml").read_text())
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return {"watch": watch_main, "simulate": simulate_main}[command](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
