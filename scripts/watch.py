"""`python scripts/watch.py [key=value ...]`: the same as `inspect3d watch [key=value ...]`.

Overrides of configs/watch.yaml are merged with OmegaConf rather than @hydra.main, because
`model=` (a key of the stable interface) is also a Hydra config group in configs/.
"""

import sys

from inspect3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["watch", *sys.argv[1:]]))
