"""`python scripts/eval.py [overrides]`: the same as `inspect3d eval [overrides]`."""

import hydra

from inspect3d.cli import eval_task
from inspect3d.config import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")
def main(cfg) -> object:
    return eval_task(cfg)


if __name__ == "__main__":
    main()
