#!/usr/bin/env python
"""Copy a stratified subset of the FER-2013 image folders, small enough to travel to a GPU machine.

    python benchmarks/fer_subset.py ../shared/data/fer2013 data/fer2013_subset --fraction 0.25

Keeps every class's first ``fraction`` of train/<class>/*.jpg (sorted by name) and all of
test/ (or ``--test-fraction``). ``data/`` is ignored by git: never commit the images.
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--fraction", type=float, default=0.25, help="of each training class")
    p.add_argument("--test-fraction", type=float, default=1.0, help="of each test class")
    args = p.parse_args(argv)
    total = nbytes = 0
    for split, fraction in (("train", args.fraction), ("test", args.test_fraction)):
        for folder in sorted((args.src / split).iterdir()):
            files = sorted(f for f in folder.iterdir() if f.is_file())
            keep = files[: max(1, math.ceil(len(files) * fraction))]
            out = args.dst / split / folder.name
            out.mkdir(parents=True, exist_ok=True)
            for f in keep:
                shutil.copy2(f, out / f.name)
                nbytes += f.stat().st_size
            total += len(keep)
    print(f"copied {total} images ({nbytes / 2**20:.1f} MiB) to {args.dst}")


if __name__ == "__main__":
    main()
