"""``python -m inspect3d``: the same as the ``inspect3d`` command."""

import sys

from inspect3d.cli import main

sys.exit(main())
