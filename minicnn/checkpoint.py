"""Safe ``.npz`` files: atomic writes, no pickle, clear errors.

Everything minicnn saves (models, training checkpoints) is a flat mapping of
names to plain numeric arrays plus one JSON document stored as a unicode
array under ``__meta__``. Files are written to a temporary file in the same
folder and renamed into place, so a crash never leaves a half-written file,
and read with ``allow_pickle=False``, so loading a file never runs code.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .backend import to_host

__all__ = ["CheckpointError", "save_npz", "load_npz"]

META_KEY = "__meta__"


class CheckpointError(ValueError):
    """A file that cannot be used as a minicnn checkpoint; the message says why."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_npz(path, arrays: dict, meta: dict | None = None) -> Path:
    """Write ``arrays`` (name -> array, host or device) and ``meta`` (JSON-able) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {}
    for name, arr in arrays.items():
        host = to_host(arr)
        if host.dtype == object:
            raise CheckpointError(f"cannot save {name!r}: object arrays are not allowed (they would need pickle)")
        payload[name] = host
    if META_KEY in payload:
        raise CheckpointError(f"{META_KEY!r} is a reserved name")
    payload[META_KEY] = np.array(json.dumps(meta or {}))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_npz(path) -> tuple[dict, dict]:
    """Read a file written by :func:`save_npz`: returns (arrays as NumPy, meta dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile, OSError, EOFError) as exc:
        # A file that is no zip at all makes NumPy try (and refuse) to unpickle it.
        raise CheckpointError(f"{path}: not a minicnn .npz file ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: holds a single .npy array, expected an .npz archive of named arrays")
    arrays = {}
    with data:
        for name in data.files:
            try:
                arrays[name] = data[name]
            except ValueError as exc:  # raised for object (pickled) arrays
                raise CheckpointError(
                    f"{path}: array {name!r} holds pickled Python objects, which minicnn refuses to load ({exc})"
                ) from None
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise CheckpointError(f"{path}: array {name!r} is unreadable or truncated ({exc})") from None
    meta_arr = arrays.pop(META_KEY, None)
    meta = {}
    if meta_arr is not None:
        try:
            meta = json.loads(str(meta_arr))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: its {META_KEY!r} entry is not valid JSON ({exc})") from None
    return arrays, meta
