"""Move a training run between this machine and the GPU machine, whose transfers have size limits.

The GPU machine takes at most 64 MiB of working tree (tracked files, FER-2013's images and whatever is
carried) and gives back at most 8 files of 16 MiB each. A resumable checkpoint of ``vgg_fer_slim``
(weights plus SGD momentum) is 17.8 MiB: too big to come back whole. So:

    python benchmarks/travel.py pack RUN_DIR OUT_DIR      # on the GPU machine (benchmarks/gpu_train.sh does it)
    python benchmarks/travel.py unpack FILES_AT RUN_DIR   # here, on what came back

``pack`` writes into OUT_DIR: ``last.npz`` cut into pieces of at most 15 MiB (``last.npz.part00``, ...),
``best.npz`` exported without optimiser state (float32, bit-exact weights: it is only evaluated, never
resumed), ``history.json``, and ``travel.json``, the manifest: every file's size and SHA-256, and the
pieces in order. ``unpack`` checks every piece against the manifest, joins them, checks the joined
``last.npz`` and that it opens as a checkpoint, and only then replaces RUN_DIR's files (each written to a
temporary name and renamed). A missing or damaged piece is refused by name and RUN_DIR is left as it was.

The next GPU session carries ``RUN_DIR/last.npz`` alone (``best.npz`` stays here), and
``train.py --resume`` continues from it; a session whose epochs do not beat the best brings no
``best.npz`` back, and the one here stays the run's best.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from minicnn.checkpoint import CheckpointError  # noqa: E402
from minicnn.cli.common import open_checkpoint  # noqa: E402
from minicnn.training import export_for_inference  # noqa: E402

PIECE_BYTES = 15 * 2**20  # the device returns files of at most 16 MiB
MANIFEST = "travel.json"


class TravelError(Exception):
    """A run folder or a fetched folder that cannot be packed or unpacked; the message names the file."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_file(path: Path, out_dir: Path, piece_bytes: int = PIECE_BYTES) -> list[dict]:
    """Cut ``path`` into ``out_dir/NAME.partNN`` of at most ``piece_bytes``; returns their records in order."""
    pieces = []
    with path.open("rb") as f:
        for index in range(100):
            block = f.read(piece_bytes)
            if not block and index:
                break
            piece = out_dir / f"{path.name}.part{index:02d}"
            piece.write_bytes(block)
            pieces.append({"name": piece.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
        else:
            raise TravelError(f"{path}: {path.stat().st_size} bytes would need more than 100 pieces")
    return pieces


def pack(run_dir: Path, out_dir: Path, piece_bytes: int = PIECE_BYTES) -> dict:
    """Write run ``run_dir`` into ``out_dir`` as described in the module docstring; returns the manifest."""
    last = run_dir / "last.npz"
    if not last.is_file():
        raise TravelError(f"{last} does not exist: {run_dir} holds no run to pack (train.py writes last.npz "
                          "before the first epoch)")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"last.npz": {"bytes": last.stat().st_size, "sha256": sha256_of(last),
                             "pieces": split_file(last, out_dir, piece_bytes)}}
    best = run_dir / "best.npz"
    if best.is_file():
        export_for_inference(best, out_dir / "best.npz", dtype="float32")
        manifest["best.npz"] = {"bytes": (out_dir / "best.npz").stat().st_size,
                                "sha256": sha256_of(out_dir / "best.npz")}
    if (run_dir / "history.json").is_file():
        shutil.copyfile(run_dir / "history.json", out_dir / "history.json")
        manifest["history.json"] = {"bytes": (out_dir / "history.json").stat().st_size,
                                    "sha256": sha256_of(out_dir / "history.json")}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _checked(path: Path, record: dict) -> Path:
    if not path.is_file():
        raise TravelError(f"{path} is missing: the manifest lists it ({record['bytes']} bytes)")
    size = path.stat().st_size
    if size != record["bytes"] or sha256_of(path) != record["sha256"]:
        raise TravelError(f"{path} is damaged: expected {record['bytes']} bytes with SHA-256 {record['sha256'][:16]}..., "
                          f"found {size} bytes with SHA-256 {sha256_of(path)[:16]}...")
    return path


def unpack(fetched: Path, run_dir: Path) -> list[str]:
    """Check and join what :func:`pack` wrote (now in ``fetched``) into ``run_dir``; returns the files replaced."""
    manifest_path = fetched / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        last_record = manifest["last.npz"]
        pieces = last_record["pieces"]
    except FileNotFoundError:
        raise TravelError(f"{manifest_path} does not exist: {fetched} is not the output of travel.py pack") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise TravelError(f"{manifest_path} is not a travel manifest ({exc!r})") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    staged = []  # (temporary file, final name), renamed only once everything checked out
    try:
        joined = run_dir / "last.npz.travel-tmp"
        staged.append((joined, "last.npz"))  # before it exists: a bad piece must not leave half a file
        with joined.open("wb") as out:
            for piece in pieces:
                out.write(_checked(fetched / piece["name"], piece).read_bytes())
        _checked(joined, last_record)
        try:
            open_checkpoint(joined)
        except CheckpointError as exc:
            raise TravelError(f"the joined last.npz does not open as a checkpoint: {exc}") from None
        for name in ("best.npz", "history.json"):
            if name in manifest:
                tmp = run_dir / f"{name}.travel-tmp"
                shutil.copyfile(_checked(fetched / name, manifest[name]), tmp)
                staged.append((tmp, name))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, name in staged:
        os.replace(tmp, run_dir / name)
    return [name for _, name in staged]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    p_pack = sub.add_parser("pack", help="run folder -> folder of pieces (on the GPU machine)")
    p_pack.add_argument("run_dir", type=Path)
    p_pack.add_argument("out_dir", type=Path)
    p_unpack = sub.add_parser("unpack", help="folder of pieces -> run folder (here)")
    p_unpack.add_argument("fetched", type=Path)
    p_unpack.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    try:
        if args.command == "pack":
            manifest = pack(args.run_dir, args.out_dir)
            pieces = manifest["last.npz"]["pieces"]
            print(f"packed {args.run_dir} into {args.out_dir}: last.npz in {len(pieces)} piece(s), "
                  + ", ".join(k for k in manifest if k != "last.npz"))
        else:
            replaced = unpack(args.fetched, args.run_dir)
            print(f"unpacked {args.fetched} into {args.run_dir}: {', '.join(replaced)}")
    except TravelError as exc:
        print(f"travel.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
