"""Move a training run between this machine and the GPU machine, whose transfers have size limits.

The GPU machine takes at most 64 MiB of working tree (tracked files, FER-2013's images and whatever is
carried) and gives back at most 8 files of 16 MiB each. A resumable checkpoint of ``ece662_resnet``
(weights plus SGD momentum) is 22.8 MiB: with the repository and the Training images it would not fit
the way there, and it is too big to come back whole. So:

    python benchmarks/travel.py pack RUN_DIR OUT_DIR      # on the GPU machine (benchmarks/gpu_train.sh does it)
    python benchmarks/travel.py unpack FILES_AT RUN_DIR   # here, on what came back
    python benchmarks/travel.py carry RUN_DIR             # here, before a session: RUN_DIR/last.npz.packed
    python benchmarks/travel.py expand RUN_DIR            # on the GPU machine (gpu_train.sh does it)

A *packed* file is ``last.npz`` made smaller without losing a bit: its bytes are regrouped in four
planes (byte 0 of every 4-byte word, then byte 1, ...) and deflated (zlib). float32 arrays compress
badly as they are, but their sign-and-exponent bytes are few and repetitive once they sit side by side:
17 % smaller on an Adam checkpoint of ``dlcv_cnn`` (zlib alone: 9 %, xz 10 %). The planes ignore where each
array starts inside the zip: an array at an offset that is not a multiple of 4 just lands in rotated
planes, which compresses as well. The file is a text line ``minicnn-travel-packed 1``, a JSON line with
the original's name, size and SHA-256, then the deflated planes; expanding checks size and SHA-256.

``pack`` writes into OUT_DIR: ``last.npz`` packed and cut into pieces of at most 15 MiB
(``last.npz.packed.part00``, ...), ``best.npz`` exported without optimiser state (float32, bit-exact
weights: it is only evaluated, never resumed), ``history.json``, and ``travel.json``, the manifest:
every file's size and SHA-256, and the pieces in order. ``unpack`` checks every piece against the
manifest, joins and expands them, checks the expanded ``last.npz`` and that it opens as a checkpoint,
and only then replaces RUN_DIR's files (each written to a temporary name and renamed). A missing or
damaged piece is refused by name and RUN_DIR is left as it was.

The next GPU session carries ``RUN_DIR/last.npz.packed`` alone (``carry`` writes it from the run's
current ``last.npz``, so run it again whenever ``last.npz`` changed here; ``best.npz`` stays here);
``gpu_train.sh`` expands it and ``train.py --resume`` continues from it. A session whose epochs do not
beat the best brings no ``best.npz`` back, and the one here stays the run's best.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from minicnn.checkpoint import CheckpointError, write_bytes  # noqa: E402
from minicnn.cli.common import open_checkpoint  # noqa: E402
from minicnn.training import export_for_inference  # noqa: E402

PIECE_BYTES = 15 * 2**20  # the device returns files of at most 16 MiB
MANIFEST = "travel.json"
PACKED_SUFFIX = ".packed"
PACKED_MAGIC = b"minicnn-travel-packed 1\n"
PLANES = 4  # float32: one plane per byte of the word


class TravelError(Exception):
    """A run folder or a fetched folder that cannot be packed or unpacked; the message names the file."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_planes(data: bytes, planes: int = PLANES) -> bytes:
    """Regroup ``data`` as byte 0 of every ``planes``-byte word, then byte 1, ...; a ragged tail stays last."""
    whole = len(data) // planes * planes
    words = np.frombuffer(data, dtype=np.uint8, count=whole).reshape(-1, planes)
    return words.T.tobytes() + data[whole:]


def join_planes(data: bytes, planes: int = PLANES) -> bytes:
    """The inverse of :func:`split_planes`."""
    whole = len(data) // planes * planes
    columns = np.frombuffer(data, dtype=np.uint8, count=whole).reshape(planes, -1)
    return columns.T.tobytes() + data[whole:]


def packed_bytes(path: Path) -> bytes:
    """``path``'s bytes as a packed file (module docstring): magic line, JSON line, deflated byte planes."""
    data = path.read_bytes()
    header = {"name": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "planes": PLANES, "codec": "zlib"}
    return PACKED_MAGIC + json.dumps(header).encode() + b"\n" + zlib.compress(split_planes(data), 6)


def expanded_bytes(packed: bytes, what: str) -> bytes:
    """The original bytes of a packed file, checked against its header; ``what`` names it in errors."""
    if not packed.startswith(PACKED_MAGIC):
        raise TravelError(f"{what} is not a packed file: it should start with {PACKED_MAGIC!r}, "
                          f"found {packed[:len(PACKED_MAGIC)]!r}")
    line_end = packed.find(b"\n", len(PACKED_MAGIC))
    try:
        header = json.loads(packed[len(PACKED_MAGIC):line_end])
        size, digest, planes = int(header["bytes"]), str(header["sha256"]), int(header["planes"])
        if header["codec"] != "zlib" or planes < 1:
            raise ValueError(f"codec {header['codec']!r} with {planes} planes")
    except (ValueError, KeyError, TypeError) as exc:
        raise TravelError(f"{what} has a damaged header line (expected JSON with bytes, sha256, planes "
                          f"and codec 'zlib'): {exc}") from None
    try:
        data = join_planes(zlib.decompress(packed[line_end + 1:]), planes)
    except zlib.error as exc:
        raise TravelError(f"{what} is damaged: its deflated data does not expand ({exc})") from None
    found = hashlib.sha256(data).hexdigest()
    if len(data) != size or found != digest:
        raise TravelError(f"{what} is damaged: it should expand to {size} bytes with SHA-256 {digest[:16]}..., "
                          f"found {len(data)} bytes with SHA-256 {found[:16]}...")
    return data


def carry(run_dir: Path) -> Path:
    """Write ``run_dir/last.npz.packed`` from ``run_dir/last.npz``: the file a GPU session carries."""
    last = run_dir / "last.npz"
    if not last.is_file():
        raise TravelError(f"{last} does not exist: {run_dir} holds no run to carry")
    try:
        open_checkpoint(last)
    except CheckpointError as exc:
        raise TravelError(f"{last} does not open as a checkpoint, so it is not worth carrying: {exc}") from None
    packed = run_dir / ("last.npz" + PACKED_SUFFIX)
    write_bytes(packed, packed_bytes(last))
    return packed


def expand(run_dir: Path) -> Path:
    """Write ``run_dir/last.npz`` from the carried ``run_dir/last.npz.packed``, checked, atomically."""
    packed = run_dir / ("last.npz" + PACKED_SUFFIX)
    if not packed.is_file():
        raise TravelError(f"{packed} does not exist: carry it (travel.py carry RUN_DIR writes it)")
    last = run_dir / "last.npz"
    data = expanded_bytes(packed.read_bytes(), str(packed))
    if last.is_file():  # never overwrite a newer state of the run with an older one
        if last.read_bytes() == data:
            return last
        raise TravelError(f"{last} exists and differs from what {packed.name} holds: refusing to replace it "
                          f"(remove {last.name} to resume from the packed file, or run `travel.py carry` to "
                          f"pack the current one)")
    write_bytes(last, data)
    return last


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
    with tempfile.TemporaryDirectory() as scratch:  # the whole packed file must not sit in OUT_DIR too
        packed = Path(scratch) / ("last.npz" + PACKED_SUFFIX)
        packed.write_bytes(packed_bytes(last))
        manifest = {"last.npz": {"bytes": last.stat().st_size, "sha256": sha256_of(last),
                                 "packed": {"bytes": packed.stat().st_size, "sha256": sha256_of(packed)},
                                 "pieces": split_file(packed, out_dir, piece_bytes)}}
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
        if "packed" in last_record:  # an older manifest (no "packed") cut last.npz itself into pieces
            _checked(joined, last_record["packed"])
            joined.write_bytes(expanded_bytes(joined.read_bytes(), "the joined last.npz.packed"))
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
    p_carry = sub.add_parser("carry", help="RUN_DIR/last.npz -> RUN_DIR/last.npz.packed, to carry to a session (here)")
    p_carry.add_argument("run_dir", type=Path)
    p_expand = sub.add_parser("expand", help="RUN_DIR/last.npz.packed -> RUN_DIR/last.npz (on the GPU machine)")
    p_expand.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    try:
        if args.command == "pack":
            manifest = pack(args.run_dir, args.out_dir)
            pieces = manifest["last.npz"]["pieces"]
            packed = [f"last.npz in {len(pieces)} piece(s)"] + [k for k in manifest if k != "last.npz"]
            print(f"packed {args.run_dir} into {args.out_dir}: {', '.join(packed)}")
        elif args.command == "unpack":
            replaced = unpack(args.fetched, args.run_dir)
            print(f"unpacked {args.fetched} into {args.run_dir}: {', '.join(replaced)}")
        elif args.command == "carry":
            packed = carry(args.run_dir)
            size = (args.run_dir / "last.npz").stat().st_size
            print(f"wrote {packed}: {packed.stat().st_size / 2**20:.1f} MiB for last.npz's {size / 2**20:.1f} MiB "
                  f"({packed.stat().st_size / size:.1%}); carry it to the GPU session")
        else:
            last = expand(args.run_dir)
            print(f"expanded {args.run_dir / ('last.npz' + PACKED_SUFFIX)} into {last} "
                  f"({last.stat().st_size / 2**20:.1f} MiB, SHA-256 checked)")
    except TravelError as exc:
        print(f"travel.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
