"""Safe ``.npz`` files: atomic writes, no pickle, clear errors.

Everything minicnn saves (models, training checkpoints) is a flat mapping of
names to plain numeric arrays plus one JSON document stored as a unicode
array under ``__meta__``. Files are written to a temporary file in the same
folder and renamed into place, so a crash never leaves a half-written file,
and read with ``allow_pickle=False``, so loading a file never runs code.

Reading a file never trusts it: :func:`inspect_npz` reads only the zip
directory and each member's ``.npy`` header (names, dtypes, shapes, declared
sizes) and refuses a file whose arrays would not fit its declared sizes, are
not plain numbers, or add up to more than :data:`MAX_ARRAY_BYTES`, before a
single array is decompressed; so a crafted file cannot exhaust memory.

:func:`write_json` writes JSON documents (histories, metrics) the same atomic
way, with ``null`` for NaN and infinities (bare ``NaN`` is not JSON).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .backend import to_host

__all__ = ["CheckpointError", "save_npz", "load_npz", "inspect_npz", "write_json", "write_text", "write_bytes", "finite_json",
           "MAX_ARRAY_BYTES", "clean_orphaned_tmp", "quantize_int8", "dequantize_int8", "SCALE_PREFIX"]

META_KEY = "__meta__"
#: Largest total of array bytes a file may declare (the biggest zoo network with its Adam state is ~50 MB).
MAX_ARRAY_BYTES = int(os.environ.get("MINICNN_MAX_CHECKPOINT_BYTES", 4 * 2**30))
#: Largest ``__meta__`` JSON document, in bytes (a long history is a few hundred kB).
MAX_META_BYTES = 64 * 2**20
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


class CheckpointError(ValueError):
    """A file that cannot be used as a minicnn checkpoint; the message says why."""


# -- int8 weights (``minicnn export --dtype int8``) -----------------------------------------
#: ``scale/<name>`` holds the float32 scales of the int8 array ``<name>``.
SCALE_PREFIX = "scale/"


def _output_axis(ndim: int) -> int:
    # Dense weights are (in, out): one scale per output column. Convolution kernels are
    # (out, in, kh, kw): one scale per output channel. Scaling per output unit keeps a unit
    # with small weights from being rounded to a few levels by its neighbours' large ones.
    return 1 if ndim == 2 else 0


def quantize_int8(array: np.ndarray):
    """Symmetric int8 quantisation with one scale per output unit: ``(q, scale)``.

    For an output unit ``i`` (a dense layer's column, a convolution's output channel)::

        scale_i = max_j |W_ij| / 127          (1 where the unit's weights are all zero)
        q_ij    = round(W_ij / scale_i)       in [-127, 127], stored as int8
        W_ij   ~= q_ij * scale_i,             with |W_ij - q_ij * scale_i| <= scale_i / 2

    ``scale`` is float32 and keeps ``array``'s number of axes (size 1 on all but the
    output axis), so ``q * scale`` broadcasts back to the weights.
    """
    w = np.asarray(array, dtype=np.float64)
    if w.ndim < 2:
        raise ValueError(f"quantize_int8: expected a weight matrix or kernel (2 or more axes), got shape {w.shape}")
    axis = _output_axis(w.ndim)
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    peak = np.max(np.abs(w), axis=reduce, keepdims=True)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale.astype(np.float64)), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(arrays: dict, dtype=np.float32, source="arrays") -> dict:
    """``arrays`` with every int8 array that has a ``scale/<name>`` entry turned back into ``dtype``.

    The ``scale/`` entries are consumed; every other array is returned as it is. Refuses
    (:class:`CheckpointError`, naming the array) a scale without its array, an int8 weight
    without its scale, and a scale of the wrong shape or not finite and positive.
    """
    out = {k: v for k, v in arrays.items() if not k.startswith(SCALE_PREFIX)}
    for key, scale in arrays.items():
        if not key.startswith(SCALE_PREFIX):
            continue
        name = key[len(SCALE_PREFIX):]
        q = arrays.get(name)
        if q is None:
            raise CheckpointError(f"{source}: {key!r} scales an array {name!r} that the file does not hold")
        if q.dtype != np.int8:
            raise CheckpointError(f"{source}: {name!r} has a scale ({key!r}) but dtype {q.dtype}, expected int8")
        expected = tuple(n if a == _output_axis(q.ndim) else 1 for a, n in enumerate(q.shape))
        if tuple(scale.shape) != expected:
            raise CheckpointError(f"{source}: {key!r} has shape {tuple(scale.shape)}, expected {expected} "
                                  f"(one scale per output unit of {name!r}, shape {tuple(q.shape)})")
        if scale.dtype.kind != "f" or not (np.isfinite(scale).all() and (scale > 0).all()):
            raise CheckpointError(f"{source}: {key!r} must hold finite, positive floating-point scales")
        out[name] = (q.astype(np.float32) * scale.astype(np.float32)).astype(dtype, copy=False)
    unscaled = sorted(k for k, v in out.items() if k.startswith(("param/", "buffer/")) and v.dtype == np.int8)
    if unscaled:
        raise CheckpointError(f"{source}: {unscaled[:4]} are int8 weights without their {SCALE_PREFIX}<name> scales; "
                              "the file is damaged or was not written by minicnn export")
    return out


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
    return _write_atomic(path, lambda fh: np.savez(fh, **payload))


def _write_atomic(path: Path, write) -> Path:
    """Call ``write(binary file)`` on a temporary file beside ``path``, then rename it into place.

    The temporary file is named ``.<name>.<random>.tmp``; a process killed
    mid-write (kill -9) leaves it behind, and :func:`clean_orphaned_tmp`
    removes such leftovers at the next start.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def clean_orphaned_tmp(folder, names) -> list[Path]:
    """Remove the temporary files a killed writer of ``folder/<name>`` left behind; returns them."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for name in names:
        for tmp in folder.glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def finite_json(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON ``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _write_atomic(Path(path), lambda fh: fh.write(data))


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    return write_bytes(path, text.encode())


def write_json(path, obj, indent=1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; NaN and infinities become ``null``."""
    return write_text(path, json.dumps(finite_json(obj), indent=indent, allow_nan=False) + "\n")


def _describe_start(head: bytes) -> str:
    if not head:
        return "it is empty"
    if head.startswith(_NPY_MAGIC):
        return "it is a single .npy array, not an .npz archive of named arrays"
    if head.startswith(b"\x89PNG"):
        return "it is a PNG image, not a checkpoint"
    if head.startswith(b"\xff\xd8\xff"):
        return "it is a JPEG image, not a checkpoint"
    if head[:1] == b"\x80":
        return "it looks like a Python pickle, which minicnn never loads"
    if head.startswith(b"PK\x05\x06"):
        return "it is an empty zip archive (an .npz with no arrays at all)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    # Text has no NUL bytes and few control characters; anything else is described by its first bytes.
    if text is not None and "\x00" not in text and all(c.isprintable() or c in "\t\n\r" for c in text[:64]):
        return f"it looks like a text file, starting {text[:40]!r}"
    return f"it starts with bytes {head[:16]!r}"


def inspect_npz(path) -> dict:
    """``{name: (dtype, shape)}`` of the arrays of an ``.npz`` file, from its headers alone.

    Reads the zip directory and the few bytes of each member's ``.npy``
    header; decompresses nothing else. Raises :class:`CheckpointError` for a
    file that is not a zip archive, a member that is not a ``.npy`` array, a
    duplicated name, an object (pickled) dtype, an array larger than its
    member's declared size, or arrays totalling more than :data:`MAX_ARRAY_BYTES`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head.startswith(_ZIP_MAGIC):
        raise CheckpointError(f"{path}: not a minicnn .npz file: {_describe_start(head)}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable .npz (zip) archive ({exc})") from None
    found, total = {}, 0
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise CheckpointError(f"{path}: member {info.filename!r} is not a .npy array")
            name = info.filename[: -len(".npy")]
            if name in found:
                raise CheckpointError(f"{path}: array {name!r} appears twice in the archive")
            try:
                with zf.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
                    else:
                        raise ValueError(f"unsupported .npy format version {version}")
                    header_len = member.tell()
            except (ValueError, zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
                raise CheckpointError(f"{path}: array {name!r} has an unreadable header ({exc})") from None
            if dtype.hasobject:
                raise CheckpointError(
                    f"{path}: array {name!r} holds Python objects (dtype {dtype}), which would need pickle; "
                    "minicnn refuses to load it")
            count = int(np.prod(shape, dtype=np.float64)) if shape else 1
            nbytes = count * dtype.itemsize
            if nbytes > info.file_size - header_len:
                raise CheckpointError(
                    f"{path}: array {name!r} claims shape {tuple(shape)} {dtype} ({nbytes:,} bytes) but its "
                    f"member holds only {info.file_size - header_len:,} bytes: the file is truncated or crafted")
            limit = MAX_META_BYTES if name == META_KEY else MAX_ARRAY_BYTES
            total += nbytes
            if nbytes > limit or total > MAX_ARRAY_BYTES:
                raise CheckpointError(
                    f"{path}: its arrays declare {total:,} bytes, more than the {limit:,} a minicnn checkpoint "
                    "may hold (set MINICNN_MAX_CHECKPOINT_BYTES to allow more)")
            found[name] = (dtype, tuple(shape))
    return found


def load_npz(path, check=None) -> tuple[dict, dict]:
    """Read a file written by :func:`save_npz`: returns (arrays as NumPy, meta dict).

    The headers are checked with :func:`inspect_npz` first. ``check``, when
    given, is called as ``check(meta, headers)`` (``headers`` as
    :func:`inspect_npz` returns them) after the small ``__meta__`` entry is read
    and before any other array is decompressed; it raises to refuse the file.
    """
    path = Path(path)
    headers = inspect_npz(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile, OSError, EOFError) as exc:
        # A file that is no zip at all makes NumPy try (and refuse) to unpickle it.
        raise CheckpointError(f"{path}: not a minicnn .npz file ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: holds a single .npy array, expected an .npz archive of named arrays")
    arrays = {}
    with data:
        names = list(data.files)
        if check is not None:
            meta = _read_meta(path, data[META_KEY] if META_KEY in names else None)
            check(meta, {k: v for k, v in headers.items() if k != META_KEY})
        for name in names:
            try:
                arrays[name] = data[name]
            except ValueError as exc:  # raised for object (pickled) arrays
                raise CheckpointError(
                    f"{path}: array {name!r} holds pickled Python objects, which minicnn refuses to load ({exc})"
                ) from None
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise CheckpointError(f"{path}: array {name!r} is unreadable or truncated ({exc})") from None
    return arrays, _read_meta(path, arrays.pop(META_KEY, None))


def _read_meta(path, meta_arr) -> dict:
    if meta_arr is None:
        return {}
    if meta_arr.dtype.kind != "U" or meta_arr.ndim != 0:
        raise CheckpointError(f"{path}: its {META_KEY!r} entry is not a JSON string (found {meta_arr.dtype} "
                              f"{meta_arr.shape})")
    try:
        meta = json.loads(str(meta_arr))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: its {META_KEY!r} entry is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its {META_KEY!r} entry is JSON but not an object")
    return meta
