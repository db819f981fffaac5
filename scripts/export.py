"""`python scripts/export.py [overrides]`: the same as `inspect3d export [overrides]`."""

import hydra

from inspect3d.cli import export_task
from inspect3d.config import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="export", version_base="1.3")
def main(cfg) -> object:
    return export_task(cfg)


if __name__ == "__main__":
    main()
