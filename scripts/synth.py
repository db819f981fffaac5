"""`python scripts/synth.py [overrides]`: the same as `inspect3d synth [overrides]`."""

import hydra

from inspect3d.cli import synth_task
from inspect3d.config import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="synth", version_base="1.3")
def main(cfg) -> object:
    return synth_task(cfg)


if __name__ == "__main__":
    main()
