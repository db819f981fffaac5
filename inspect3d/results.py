"""A command's result lines (a parity check, an int8 check): what a person reads on stdout.

The library logs them (``RESULTS.info``) and prints nothing; the CLI shows them on stdout
with ``to_stdout``. Called from Python, they are ordinary INFO log records.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

RESULTS = logging.getLogger("inspect3d.results")


@contextmanager
def to_stdout() -> Iterator[None]:
    """Within the block, result lines go to stdout as plain text (not to the log)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = RESULTS.level, RESULTS.propagate
    RESULTS.addHandler(handler)
    RESULTS.setLevel(logging.INFO)
    RESULTS.propagate = False
    try:
        yield
    finally:
        RESULTS.removeHandler(handler)
        RESULTS.setLevel(saved[0])  # setLevel, not .level: it also clears the level cache
        RESULTS.propagate = saved[1]
