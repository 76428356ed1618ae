"""``minicnn cache``: where decoded FER-2013 arrays are cached, how big they are; ``--clear`` removes them.

Loading FER-2013 decodes 32,298 JPEGs (or parses a 300 MB CSV) once; the arrays are then kept
as one ``.npz`` of about 70 MB per source in ``$MINICNN_CACHE`` (default ``~/.cache/minicnn``),
keyed on the source's path, file sizes and modification times, so a changed source is decoded
again. ``MINICNN_CACHE=off`` turns the cache off (every load decodes the source).
"""
from __future__ import annotations

import argparse
import sys

from minicnn.data.fer2013 import cache_enabled, cache_files, default_cache_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clear", action="store_true", help="remove every cached FER-2013 array file")
    p.add_argument("--dir", default=None, help="the cache folder (default $MINICNN_CACHE or ~/.cache/minicnn)")
    args = p.parse_args(argv)
    folder = default_cache_dir() if args.dir is None else args.dir
    files = cache_files(folder)
    total = sum(f.stat().st_size for f in files)
    state = "on" if cache_enabled() else "off ($MINICNN_CACHE=off: loads decode the source every time)"
    print(f"cache: {folder} ({state}): {len(files)} file(s), {total / 2**20:.1f} MiB")
    for f in files:
        print(f"  {f.name}  {f.stat().st_size / 2**20:.1f} MiB")
    if args.clear:
        for f in files:
            try:
                f.unlink()
            except OSError as exc:
                print(f"error: {f}: cannot remove it: {exc.strerror or exc}", file=sys.stderr)
                return 2
        print(f"removed {len(files)} file(s), {total / 2**20:.1f} MiB")
    return 0
