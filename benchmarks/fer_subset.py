#!/usr/bin/env python
"""Copy or pack a stratified subset of the FER-2013 image folders, small enough to travel to a GPU machine.

    python benchmarks/fer_subset.py ../shared/data/fer2013 data/fer2013_subset --fraction 0.25   # a folder
    python benchmarks/fer_subset.py ../shared/data/fer2013 data/fer2013.tar.xz --fraction 1      # all, packed
    python benchmarks/fer_subset.py ../shared/data/fer2013 data/fer2013_train.tar.xz --fraction 1 --test-fraction 0

Keeps every class's first ``fraction`` of train/<class>/*.jpg (sorted by name) and all of
test/ (or ``--test-fraction``; ``0`` packs Training only). A destination ending in ``.tar.xz`` is written as one
xz-compressed tar archive instead of a folder: the files inside are byte-identical to the
originals, but the JPEG headers that every 48x48 file repeats (about a third of its bytes)
compress away across files, so all of FER-2013 (48.5 MiB of JPEGs) packs into 37.3 MiB. The
archive is reproducible: sorted names, no owners, mtime 0, so the same images give the same
bytes (its SHA-256 is printed). minicnn reads it as it is (``--data data/fer2013.tar.xz``,
``FER2013_DATA=data/fer2013.tar.xz``); ``tar -xJf data/fer2013.tar.xz -C DIR`` unpacks it.
``data/`` is ignored by git: never commit the images.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import tarfile
from pathlib import Path

SPLITS = ("train", "test")


def select(src: Path, fraction: float, test_fraction: float) -> list[tuple[Path, str]]:
    """``(file, relative path)`` of the kept images: the first ``fraction`` of each class, by name."""
    if not 0.0 < fraction <= 1.0 or not 0.0 <= test_fraction <= 1.0:
        raise SystemExit(f"fer_subset: --fraction must lie in (0, 1] and --test-fraction in [0, 1], "
                         f"got {fraction} and {test_fraction}")
    kept = []
    for split, share in zip(SPLITS, (fraction, test_fraction)):
        if share == 0:  # --test-fraction 0: Training only
            continue
        if not (src / split).is_dir():
            raise SystemExit(f"fer_subset: {src / split} is not a folder; expected FER-2013 as "
                             "train/<class>/*.jpg and test/<class>/*.jpg")
        for folder in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            files = sorted(f for f in folder.iterdir() if f.is_file())
            if files:
                kept += [(f, f"{split}/{folder.name}/{f.name}") for f in files[: max(1, math.ceil(len(files) * share))]]
    return kept


def copy_folder(kept, dst: Path) -> None:
    for path, rel in kept:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst / rel)


def pack_archive(kept, dst: Path, preset: int = 6) -> str:
    """Write ``kept`` into the tar.xz ``dst`` (reproducibly) and return the archive's SHA-256."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    with tarfile.open(tmp, "w:xz", preset=preset) as tar:
        for path, rel in kept:
            info = tarfile.TarInfo(rel)
            info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
            with path.open("rb") as f:
                tar.addfile(info, f)
    tmp.replace(dst)  # a killed run leaves no truncated archive under the final name
    digest = hashlib.sha256()
    with dst.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="FER-2013 folder with train/ and test/")
    p.add_argument("dst", type=Path, help="a new folder, or a file ending in .tar.xz")
    p.add_argument("--fraction", type=float, default=0.25, help="of each training class")
    p.add_argument("--test-fraction", type=float, default=1.0,
                   help="of each test class; 0 leaves test/ out (a GPU training run that reports PublicTest later, "
                        "on this machine)")
    args = p.parse_args(argv)
    kept = select(args.src, args.fraction, args.test_fraction)
    nbytes = sum(path.stat().st_size for path, _ in kept)
    if args.dst.name.endswith(".tar.xz"):
        sha = pack_archive(kept, args.dst)
        packed = args.dst.stat().st_size
        print(f"packed {len(kept)} images ({nbytes / 2**20:.1f} MiB of JPEGs) into {args.dst}: "
              f"{packed / 2**20:.1f} MiB, sha256 {sha}")
    else:
        copy_folder(kept, args.dst)
        print(f"copied {len(kept)} images ({nbytes / 2**20:.1f} MiB) to {args.dst}")


if __name__ == "__main__":
    main()
