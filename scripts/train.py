"""`python scripts/train.py [overrides]`: the same as `inspect3d train [overrides]`."""

import hydra

from inspect3d.cli import train_task
from inspect3d.config import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg) -> object:
    return train_task(cfg)


if __name__ == "__main__":
    main()
