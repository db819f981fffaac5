"""Write the committed checksum list of a data set from a trusted local copy.

Usage: python scripts/make_checksums.py FOLDER [--name NAME] [--out-dir DIR]
e.g.   python scripts/make_checksums.py ../shared/datasets/pblm
writes inspect3d/data/checksums/pblm.sha256 (``sha256sum`` format, sorted).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from inspect3d.data.fetch import write_checksums  # noqa: E402
from inspect3d.errors import InspectError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Compute and write ``<out-dir>/<name>.sha256`` for the folder given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="local copy of the data set")
    parser.add_argument("--name", help="data-set name (default: the folder's name)")
    parser.add_argument("--out-dir", type=Path, help="default: inspect3d/data/checksums")
    args = parser.parse_args(argv)
    try:
        out = write_checksums(args.name or args.folder.resolve().name, args.folder, args.out_dir)
    except InspectError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
