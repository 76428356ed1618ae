"""Load FER-2013 from any of its three public layouts, with an on-disk cache.

FER-2013 is 35,887 grayscale 48x48 faces labelled with one of seven
expressions. It circulates in three forms, all read by :func:`load_fer2013`:

* Kaggle's ``fer2013.csv``: columns ``emotion,pixels,Usage``; ``pixels`` holds
  2,304 space-separated integers 0-255 (row-major 48x48).
* ``icml_face_data.csv`` (the ICML 2013 challenge copy): the same data with
  headers ``emotion, Usage, pixels`` (leading spaces, which are stripped).
* An image folder (Kaggle ``msambare/fer2013``): ``train/<class>/*.jpg`` and
  ``test/<class>/*.jpg``, or a root holding the class folders directly; also
  packed in a zip or tar file (Kaggle's ``archive.zip`` as downloaded, or the
  ``.tar.xz`` of ``benchmarks/fer_subset.py``), read without unpacking it; an
  archive whose only entry is one of the CSVs is read as that CSV.

Everything comes back as a :class:`FERDataset` of ``uint8`` images
``(N, 48, 48)``, ``int64`` labels in the standard FER-2013 order
(:data:`CLASS_NAMES`) and the ``Usage`` of each image.

Decoding 32k JPEGs or parsing 83M pixel strings takes seconds, so the decoded
arrays are cached as an ``.npz`` keyed on the source's path, sizes and
modification times; a later load of an unchanged source reads the cache.

Any problem with the source raises :class:`DataError` naming the file, row or
folder at fault; nothing is ever returned half-loaded.
"""
from __future__ import annotations

import hashlib
import io
import lzma
import os
import posixpath
import re
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "USAGES",
    "IMAGE_SIZE",
    "DataError",
    "FERDataset",
    "load_fer2013",
    "default_cache_dir",
    "cache_enabled",
    "cache_files",
]

#: The seven FER-2013 expressions in the label order of ``fer2013.csv``.
CLASS_NAMES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
#: The three FER-2013 partitions, as spelled in the ``Usage`` column.
USAGES: tuple[str, ...] = ("Training", "PublicTest", "PrivateTest")
#: Side of the square FER-2013 images, in pixels.
IMAGE_SIZE = 48
_N_PIXELS = IMAGE_SIZE * IMAGE_SIZE
_USAGE_DTYPE = np.dtype("U11")  # len("PrivateTest")

# Bump when the decoded output of a source could change (resizing, ordering...),
# so caches written by an older loader are not served.
_CACHE_VERSION = "2"  # 2: 16-bit images scaled, not clipped

# Folder names seen in the wild for each class (compared lower-cased).
_CLASS_ALIASES = {
    "angry": 0, "anger": 0,
    "disgust": 1, "disgusted": 1,
    "fear": 2, "fearful": 2, "scared": 2,
    "happy": 3, "happiness": 3,
    "sad": 4, "sadness": 4,
    "surprise": 5, "surprised": 5,
    "neutral": 6,
}
# Split folders map to a FER-2013 Usage. "val" goes to PrivateTest: the three
# FER-2013 partitions are train / public test / private test, and
# redistributions that rename them call the third one "val" or "validation".
# A Training_/PublicTest_/PrivateTest_ file-name prefix always wins.
_SPLIT_ALIASES = {
    "train": "Training", "training": "Training",
    "test": "PublicTest", "publictest": "PublicTest", "public_test": "PublicTest",
    "val": "PrivateTest", "valid": "PrivateTest", "validation": "PrivateTest",
    "privatetest": "PrivateTest", "private_test": "PrivateTest",
}
_PREFIX_RE = re.compile(r"^(Training|PublicTest|PrivateTest)_")
_DECODE_CHUNK = 512  # images per decoding task
# What an archive's images may hold, read at most one byte further: FER-2013's are about 1.5 kB each and
# 50 MB in all, and a crafted archive (a member of zeros expands a thousandfold) must not exhaust memory.
_MAX_ARCHIVE_MEMBER_BYTES = 64 * 2**20
_MAX_ARCHIVE_TOTAL_BYTES = 2**30
_IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}


class DataError(ValueError):
    """The data source is missing, malformed or empty (the message says where)."""


@dataclass
class FERDataset:
    """Images, labels and FER-2013 ``Usage`` of a set of faces.

    Attributes:
        images: ``uint8`` array ``(N, 48, 48)``, grey levels 0-255.
        labels: ``int64`` array ``(N,)``, indices into ``class_names``.
        usage: str array ``(N,)``: ``"Training"``, ``"PublicTest"`` or ``"PrivateTest"``.
        class_names: name of each label, e.g. :data:`CLASS_NAMES`.
    """

    images: np.ndarray
    labels: np.ndarray
    usage: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self):
        self.images = np.asarray(self.images)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.usage = np.asarray(self.usage, dtype=str)
        bad = ~np.isin(self.usage, USAGES)
        if bad.any():
            raise ValueError(f"usage must be one of {USAGES}, found {self.usage[bad][0]!r}")
        # Fixed width of the longest name, so assigning "PrivateTest" later never truncates.
        self.usage = self.usage.astype(_USAGE_DTYPE)
        self.class_names = tuple(str(c) for c in self.class_names)
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 3:
            raise ValueError(
                f"images must be a uint8 array (N, H, W), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (n,) or self.usage.shape != (n,):
            raise ValueError(
                f"images, labels and usage must have the same length: "
                f"{n}, {self.labels.shape}, {self.usage.shape}"
            )
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"labels must lie in 0..{len(self.class_names) - 1} ({len(self.class_names)} classes)")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, mask_or_indices) -> "FERDataset":
        """A new dataset with the rows chosen by a boolean mask or an index array (copies)."""
        sel = np.asarray(mask_or_indices)
        if sel.dtype == bool and sel.shape != (len(self),):
            raise ValueError(f"boolean mask has shape {sel.shape}, expected ({len(self)},)")
        return FERDataset(self.images[sel], self.labels[sel], self.usage[sel], self.class_names)

    def split(self, usage: str) -> "FERDataset":
        """The rows whose ``Usage`` is ``usage`` (``"Training"``, ``"PublicTest"`` or ``"PrivateTest"``)."""
        if usage not in USAGES:
            raise ValueError(f"unknown usage {usage!r}: expected one of {USAGES}")
        return self.subset(self.usage == usage)

    def content_keys(self, salt: str = "") -> np.ndarray:
        """A ``uint64`` per image that depends only on its pixels, its label and ``salt``.

        Sorting by these keys orders the images the same way whatever the order
        of the rows or files they came from; a different ``salt`` (e.g. a
        seed) gives an independent pseudo-random order. Identical images with
        the same label get the same key.
        """
        digests = _digests(self)
        keys = digests[:, :8].copy().view("<u8").ravel()
        if salt:
            seed = np.frombuffer(hashlib.blake2b(salt.encode(), digest_size=8).digest(), dtype="<u8")
            keys = _splitmix64(keys ^ seed)
        return keys

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the sorted per-image digests of pixels and label: same images, same fingerprint.

        Independent of row order, and of the layout (CSV or folders) the images came from.
        """
        digests = _digests(self)
        order = np.lexsort(digests.T[::-1]) if len(digests) else np.arange(0)
        h = hashlib.sha256(f"fer2013-set/1 {len(self)} {','.join(self.class_names)}\n".encode())
        h.update(np.ascontiguousarray(digests[order]).tobytes())
        return h.hexdigest()

    def class_counts(self) -> dict[str, int]:
        """Number of images of each class, in label order: ``{"angry": 3995, ...}``."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def __repr__(self) -> str:
        parts = ", ".join(f"{u}={int((self.usage == u).sum())}" for u in USAGES if (self.usage == u).any())
        return f"FERDataset(n={len(self)}, classes={self.num_classes}, {parts or 'empty'})"


def _digests(ds: FERDataset) -> np.ndarray:
    """(N, 16) uint8: BLAKE2b of each image's label and pixel bytes (48x48 uint8, row-major).

    Not cached: ``images`` is a plain array a user may change in place. About 10 us per image.
    """
    out = np.empty((len(ds), 16), dtype=np.uint8)
    images = np.ascontiguousarray(ds.images)
    for i in range(len(ds)):
        h = hashlib.blake2b(int(ds.labels[i]).to_bytes(2, "little"), digest_size=16)
        h.update(images[i].data)
        out[i] = np.frombuffer(h.digest(), dtype=np.uint8)
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, vectorised: a bijective scramble of uint64 values."""
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# --------------------------------------------------------------------------- API


#: values of $MINICNN_CACHE that turn the cache off
CACHE_OFF = ("off", "0", "no", "none", "false")


def cache_enabled() -> bool:
    """False when ``$MINICNN_CACHE`` is ``off`` (or 0, no, none, false): every load then decodes the source."""
    return os.environ.get("MINICNN_CACHE", "").strip().lower() not in CACHE_OFF


def default_cache_dir() -> Path:
    """``$MINICNN_CACHE`` if set (to a folder), else ``~/.cache/minicnn``.

    Each source (a CSV, an image folder or an archive) takes one ``fer2013-<key>.npz`` of about 70 MB there;
    ``minicnn cache`` lists them and ``minicnn cache --clear`` removes them.
    """
    env = os.environ.get("MINICNN_CACHE")
    if env and env.strip().lower() not in CACHE_OFF:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "minicnn"


def cache_files(cache_dir=None) -> list[Path]:
    """The cached FER-2013 arrays in ``cache_dir`` (default :func:`default_cache_dir`), oldest first."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not folder.is_dir():
        return []
    return sorted(folder.glob("fer2013-*.npz"), key=lambda f: f.stat().st_mtime)


def load_fer2013(path, cache_dir=None, use_cache: bool | None = None, progress: bool = False) -> FERDataset:
    """Load FER-2013 from a CSV file, an image folder or an archive of one, using the cache when possible.

    Args:
        path: ``fer2013.csv``, ``icml_face_data.csv``, an image-folder root
            (``<root>/{train,test,val}/<class>/*`` or ``<root>/<class>/*``), or a
            zip or tar file (``.tar.gz``, ``.tar.xz``, ``.tar.bz2`` too) holding such a
            tree (or only a CSV), recognised by its content; folders that wrap the
            tree in the archive (``fer2013/train/...``) are stepped into.
        cache_dir: where decoded arrays are kept (default :func:`default_cache_dir`).
        use_cache: read and write the cache; ``False`` always decodes the source; None (default):
            unless ``$MINICNN_CACHE`` is ``off`` (:func:`cache_enabled`).
        progress: show a tqdm progress bar while decoding images.

    Returns:
        A :class:`FERDataset` with the 7 standard classes. CSV rows keep the
        file order; images are ordered by Usage (Training, PublicTest,
        PrivateTest), then by path.

    A CSV without a ``Usage`` column (e.g. Kaggle's ``train.csv``) is all
    Training. Image folders: colour images are converted to grayscale (PIL ``"L"``) and
    other sizes resized to 48x48 (bilinear). The ``Usage`` comes from the file
    name prefix ``Training_``/``PublicTest_``/``PrivateTest_`` when there is
    one, else from the split folder: ``train`` -> Training, ``test`` ->
    PublicTest, ``val``/``validation`` -> PrivateTest. Class folders directly
    under the root take the split of the root's own name when it is one
    (``.../test`` -> PublicTest), else Training. Hidden files and folders (names
    starting with ``.`` or ``__``, e.g. ``__MACOSX``) and non-image files are ignored.
    Errors inside an archive name the member as ``ARCHIVE:PATH``.

    Raises:
        DataError: the path does not exist, a CSV lacks the expected columns or
            has a bad row, a folder is not a known class, an image cannot be
            decoded, an archive is damaged or its images exceed 64 MiB each or 1 GiB in all, or the
            source holds no images.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or directory (expected fer2013.csv, icml_face_data.csv, "
                        "an image folder or a zip/tar of one)")
    p = p.resolve()
    if p.is_dir():
        entries = _discover_images(p)  # cheap; also validates the layout
        fingerprint = [(rel, size, mtime) for rel, _, _, (size, mtime) in entries]
    else:
        st = p.stat()
        entries = None
        fingerprint = [(p.name, st.st_size, st.st_mtime_ns)]

    cache_file = None
    if use_cache is None:
        use_cache = cache_enabled()
    if use_cache:
        cache_file = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        cache_file = cache_file / f"fer2013-{_cache_key(p, fingerprint)}.npz"
        ds = _read_cache(cache_file)
        if ds is not None:
            return ds

    ds = _load_uncached(p, entries, progress)
    if cache_file is not None:
        _write_cache(cache_file, ds)
    return ds


def _load_uncached(p: Path, entries, progress: bool) -> FERDataset:
    """Decode the source (no cache involved)."""
    if p.is_dir():
        return _load_image_folder(p, entries, progress)
    if _is_archive(p):
        return _load_archive(p, progress)
    return _load_csv(p)


# --------------------------------------------------------------------------- CSV


def _load_csv(path: Path) -> FERDataset:
    import pandas as pd  # noqa: PLC0415  (optional dependency, imported when needed)

    try:
        # Everything as str, no NA guessing: we validate each field ourselves and
        # want to report the row, not a pandas dtype error.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text CSV file ({exc})") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: file is empty, expected a CSV with columns emotion, pixels, Usage") from exc
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: malformed CSV: {exc}") from exc

    df = df.fillna("")  # short rows leave NaN even with keep_default_na=False
    df.columns = [str(c).strip() for c in df.columns]  # icml_face_data.csv has " Usage", " pixels"
    required = ["emotion", "pixels"]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; expected columns ['emotion', 'pixels', 'Usage'] "
            f"(Usage optional), found {list(df.columns)}"
        )
    n = len(df)
    if n == 0:
        raise DataError(f"{path}: the CSV has a header but no rows (empty dataset)")

    # Row numbers in messages are 1-based data rows; the file line is row + 1 (header).
    def where(i: int) -> str:
        return f"{path}: row {i + 1} (line {i + 2})"

    labels = np.empty(n, dtype=np.int64)
    for i, s in enumerate(df["emotion"].tolist()):
        s = s.strip()
        if not s.isdigit() or int(s) >= len(CLASS_NAMES):
            raise DataError(f"{where(i)}: emotion label {s!r} is not an integer in 0..{len(CLASS_NAMES) - 1}")
        labels[i] = int(s)

    if "Usage" in df.columns:
        usage = np.array([u.strip() for u in df["Usage"].tolist()], dtype=str)
        bad = np.flatnonzero(~np.isin(usage, USAGES))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{where(i)}: Usage {usage[i]!r} is not one of {list(USAGES)}")
    else:
        # Some copies (e.g. Kaggle's train.csv) have no Usage column: all training data.
        usage = np.full(n, "Training", dtype=_USAGE_DTYPE)

    images = np.empty((n, _N_PIXELS), dtype=np.uint8)
    with warnings.catch_warnings():
        # Older NumPy only warns (DeprecationWarning) where newer raises on a bad token.
        warnings.simplefilter("error", DeprecationWarning)
        for i, s in enumerate(df["pixels"].tolist()):
            images[i] = _parse_pixels(s, where(i))
    return FERDataset(images.reshape(n, IMAGE_SIZE, IMAGE_SIZE), labels, usage, CLASS_NAMES)


def _parse_pixels(s: str, where: str) -> np.ndarray:
    """Parse one ``pixels`` field into 2,304 ints 0-255, or raise DataError saying why."""
    try:
        # fromstring's text mode is ~4x faster than split + int conversion, which
        # matters for 36k rows; it stops at the first bad token, so any doubt
        # falls through to the slow diagnosis below.
        values = np.fromstring(s, dtype=np.int64, sep=" ")
    except (ValueError, DeprecationWarning):
        values = None
    if values is None or values.size != _N_PIXELS:
        tokens = s.split()
        if len(tokens) != _N_PIXELS:
            raise DataError(f"{where}: found {len(tokens)} pixel values, expected {_N_PIXELS} (48x48)")
        bad = next((t for t in tokens if not _is_int(t)), None)
        if bad is not None:
            raise DataError(f"{where}: pixel value {bad!r} is not an integer")
        ints = [int(t) for t in tokens]
        bad_int = next((v for v in ints if not 0 <= v <= 255), None)
        if bad_int is not None:
            raise DataError(f"{where}: pixel value {bad_int} outside 0..255")
        values = np.array(ints, dtype=np.int64)
    if values.min() < 0 or values.max() > 255:
        bad_val = int(values[(values < 0) | (values > 255)][0])
        raise DataError(f"{where}: pixel value {bad_val} outside 0..255")
    return values


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- image folders and archives


def _visible(name: str) -> bool:
    # Hidden files and folders (.git, .ipynb_checkpoints, __MACOSX, macOS's ._x.jpg ...) are not data.
    return not name.startswith((".", "__"))


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in _IMAGE_EXTENSIONS and _visible(name)


def _class_index(name: str, where: str) -> int:
    idx = _CLASS_ALIASES.get(name.lower())
    if idx is None:
        raise DataError(
            f"{where}: unknown class folder {name!r}; expected one of "
            f"{list(CLASS_NAMES)} (aliases: {sorted(set(_CLASS_ALIASES) - set(CLASS_NAMES))})"
        )
    return idx


def _layout_entries(root_name: str, subdirs, files, where):
    """``(relative path, label, usage, stat)`` of every image of an image-folder tree, in load order.

    The layout rules, shared by folders and archives. ``subdirs(rel)``: the sorted
    visible folder names in ``rel`` ("" is the root); ``files(rel)``: ``(name, stat)``
    of the image files in ``rel``; ``where(rel)``: how an error names ``rel``.
    Validates the layout (known class and split folder names) without decoding.
    """
    top = subdirs("")
    if not top:
        raise DataError(f"{where('')}: folder has no class or split (train/test) subfolders")
    if any(name.lower() in _SPLIT_ALIASES for name in top):
        groups = []
        for d in top:
            split = _SPLIT_ALIASES.get(d.lower())
            if split is None:
                raise DataError(
                    f"{where(d)}: unexpected folder {d!r} next to split folders; expected only "
                    f"{sorted(_SPLIT_ALIASES)} at {where('')}"
                )
            groups += [(f"{d}/{c}", c, split) for c in subdirs(d)]
    else:
        # root/<class>/..., no split level: the root itself may be a split folder
        # (e.g. ".../fer2013/test"); otherwise the images count as Training.
        groups = [(c, c, _SPLIT_ALIASES.get(root_name.lower(), "Training")) for c in top]

    entries = []
    for rel_dir, class_name, split in groups:
        label = _class_index(class_name, where(rel_dir))
        for name, stat in sorted(files(rel_dir)):
            m = _PREFIX_RE.match(name)
            entries.append((f"{rel_dir}/{name}", label, m.group(1) if m else split, stat))
    if not entries:
        raise DataError(
            f"{where('')}: no images found (looked for {sorted(_IMAGE_EXTENSIONS)} files in the class folders)"
        )
    order = {u: i for i, u in enumerate(USAGES)}
    entries.sort(key=lambda e: (order[e[2]], e[0]))
    return entries


def _discover_images(root: Path):
    """:func:`_layout_entries` of a folder on disk; the stat is ``(size, mtime_ns)`` (the cache key)."""
    # Plain strings and os.scandir, not pathlib: this runs on every (cached)
    # load over ~32k files, and pathlib objects would triple its cost.
    def scan(rel):
        with os.scandir(os.path.join(root, rel)) as it:
            return list(it)

    def subdirs(rel):
        return sorted(e.name for e in scan(rel) if e.is_dir() and _visible(e.name))

    def files(rel):  # DirEntry.stat() is cached: one system call per file
        return [(e.name, (e.stat().st_size, e.stat().st_mtime_ns))
                for e in scan(rel) if _is_image(e.name) and e.is_file()]

    return _layout_entries(root.name, subdirs, files, lambda rel: root / rel if rel else root)


def to_grey48(im) -> np.ndarray:
    """A PIL image as ``uint8 (48, 48)`` grey levels: :func:`minicnn.data.images.to_grey` at FER-2013's size.

    16-bit images (PNG/TIFF, PIL modes ``I;16*`` and ``I``) are scaled from
    0..65535 to 0..255 (``round(v / 257)``), not clipped.
    """
    from .images import to_grey  # noqa: PLC0415  (images imports this module)

    return to_grey(im, (IMAGE_SIZE, IMAGE_SIZE))


def _decode_image(file, name=None) -> np.ndarray:
    """Read one image (a path or a binary file object) as ``uint8 (48, 48)`` (see :func:`to_grey48`).

    ``name``: how an error names it (default: ``file`` itself).
    """
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with Image.open(file) as im:
            im.load()  # decode now, so a truncated file fails here and not later
            return to_grey48(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name or file}: cannot read image ({type(exc).__name__}: {exc})") from exc


def _decode_all(sources, names, progress: bool) -> np.ndarray:
    """Decode every source (a path, or the bytes of an image file) into one ``uint8 (N, 48, 48)`` array."""
    images = np.empty((len(sources), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)

    def decode_chunk(start: int) -> int:
        stop = min(start + _DECODE_CHUNK, len(sources))
        for i in range(start, stop):
            src = sources[i]
            images[i] = _decode_image(io.BytesIO(src) if isinstance(src, bytes) else src, names[i])
        return stop - start

    # PIL releases the GIL while decoding, so a few threads overlap file I/O and
    # decoding. Work goes out in chunks written straight into ``images``: one
    # future per file would cost as much as the decoding of a 48x48 JPEG.
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = pool.map(decode_chunk, range(0, len(sources), _DECODE_CHUNK))
        bar = _progress(total=len(sources)) if progress else None
        for n in done:  # also re-raises the first DataError of any chunk
            if bar is not None:
                bar.update(n)
        if bar is not None:
            bar.close()
    return images


def _dataset(entries, images) -> FERDataset:
    labels = np.array([e[1] for e in entries], dtype=np.int64)
    usage = np.array([e[2] for e in entries], dtype=_USAGE_DTYPE)
    return FERDataset(images, labels, usage, CLASS_NAMES)


def _load_image_folder(root: Path, entries, progress: bool) -> FERDataset:
    if entries is None:
        entries = _discover_images(root)
    files = [os.path.join(root, rel) for rel, _, _, _ in entries]
    return _dataset(entries, _decode_all(files, files, progress))


_ZIP_MAGIC = b"PK\x03\x04"


def _is_zip(p: Path) -> bool:
    """A zip by its end record, or by its first bytes (a truncated download has no end record)."""
    if zipfile.is_zipfile(p):
        return True
    with open(p, "rb") as fh:
        return fh.read(4) == _ZIP_MAGIC


def _is_archive(p: Path) -> bool:
    """A zip or tar file (tar.gz, tar.xz, tar.bz2 too), recognised by its content, not its name."""
    return _is_zip(p) or tarfile.is_tarfile(p)


def _member_path(name: str) -> str:
    """An archive member's path, one spelling for zip and tar: "/" separators (old Windows zips write
    backslashes), no "." or empty parts, no leading "/"; ``..`` parts resolved (nothing is extracted)."""
    return posixpath.normpath("/" + name.replace("\\", "/")).lstrip("/")


def _read_archive(p: Path) -> tuple[dict[str, bytes], list[str]]:
    """``({path: bytes} of every visible image file, [every visible member path])``, read in one pass.

    One pass because a compressed tar can only be read front to back; FER-2013's JPEGs are
    about 50 MB, so holding them all is cheap. Each image is read at most one byte past
    ``_MAX_ARCHIVE_MEMBER_BYTES``, and all of them together at most ``_MAX_ARCHIVE_TOTAL_BYTES``.
    Tar links are followed, as the folder reader follows symbolic links.
    """
    images, paths = {}, []
    total = 0

    def visible(path):
        return path and all(_visible(part) for part in path.split("/"))

    def take(path, open_member=None):
        """Note a member (a folder when ``open_member`` is None); read it if it is an image."""
        nonlocal total
        if not visible(path):
            return
        if open_member is None:
            paths.append(path + "/")
            return
        paths.append(path)
        if not _is_image(path.rpartition("/")[2]):
            return
        if path in images:
            raise DataError(f"{p}: holds {path!r} twice; which one is the image?")
        with open_member() as fh:
            data = fh.read(_MAX_ARCHIVE_MEMBER_BYTES + 1)
        if len(data) > _MAX_ARCHIVE_MEMBER_BYTES:
            raise DataError(f"{p}:{path}: an image of more than {_MAX_ARCHIVE_MEMBER_BYTES:,} bytes, more than "
                            "an image in an archive may have; not read")
        total += len(data)
        if total > _MAX_ARCHIVE_TOTAL_BYTES:
            raise DataError(f"{p}: its images add up to more than {_MAX_ARCHIVE_TOTAL_BYTES:,} bytes "
                            f"(at {path}), far more than FER-2013's 50 MB; not read further")
        images[path] = data

    try:
        if _is_zip(p):
            with zipfile.ZipFile(p) as zf:
                for info in zf.infolist():
                    path = _member_path(info.filename)
                    take(path, None if info.is_dir() else lambda info=info: zf.open(info))
        else:
            with tarfile.open(p) as tf:  # "r:*": any compression
                for member in tf:
                    path = _member_path(member.name)
                    if member.isdir():
                        take(path)
                    elif member.isfile() or member.islnk() or member.issym():
                        take(path, lambda member=member: _tar_member(tf, member, p))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"{p}: damaged archive ({type(exc).__name__}: {exc})") from exc
    except (NotImplementedError, RuntimeError) as exc:  # zipfile: Deflate64, encrypted members
        raise DataError(f"{p}: an archive this reader cannot open ({exc}); unpack it and pass the folder") from exc
    return images, paths


def _tar_member(tf, member, p):
    """A tar member's file object; a link is resolved to its target (``extractfile`` does that)."""
    try:
        fh = tf.extractfile(member)
    except KeyError:
        fh = None
    if fh is None:
        raise DataError(f"{p}:{member.name}: a link to {member.linkname!r}, which the archive does not hold")
    return fh


def _load_archive(p: Path, progress: bool) -> FERDataset:
    """An image-folder tree packed in a zip or tar file, e.g. Kaggle's ``archive.zip`` as downloaded.

    The tree is read from the member paths, with the folder reader's rules (:func:`_layout_entries`).
    Folders that wrap it (``fer2013/train/...``) are stepped into while a level holds a single
    folder that is neither a split nor a class; so the root's own name never names a split here.
    An archive without images that holds one CSV (a zipped ``fer2013.csv``) is read as that CSV.
    Errors name the member as ``ARCHIVE:PATH``.
    """
    files, paths = _read_archive(p)
    if not files:
        csvs = [path for path in paths if path.lower().endswith(".csv")]
        if len(csvs) == 1 and len(paths) == 1:
            return _load_csv(p)  # pandas reads a zip or tar of one file
        raise DataError(f"{p}: an archive with no image files in it (looked for {sorted(_IMAGE_EXTENSIONS)}); it "
                        f"holds {len(paths)} other entries" + (f", e.g. {paths[0]}" if paths else "") +
                        " (a zipped CSV is read when it is the archive's only entry)")
    folders: dict[str, set] = {}
    images_in: dict[str, list] = {}
    for path in paths:
        parts = path.rstrip("/").split("/")
        folder_parts = parts if path.endswith("/") else parts[:-1]
        for i, part in enumerate(folder_parts):
            folders.setdefault("/".join(folder_parts[:i]), set()).add(part)
    for path in files:
        head, _, name = path.rpartition("/")
        images_in.setdefault(head, []).append((name, None))

    prefix = ""
    while len(folders.get(prefix, ())) == 1:
        (only,) = folders[prefix]
        if only.lower() in _SPLIT_ALIASES or only.lower() in _CLASS_ALIASES:
            break
        prefix = f"{prefix}/{only}" if prefix else only

    def full(rel):
        return "/".join(part for part in (prefix, rel) if part)

    entries = _layout_entries(
        "",
        lambda rel: sorted(folders.get(full(rel), ())),
        lambda rel: images_in.get(full(rel), []),
        lambda rel: f"{p}:{full(rel)}" if full(rel) else str(p),
    )
    members = [full(rel) for rel, _, _, _ in entries]
    return _dataset(entries, _decode_all([files[m] for m in members], [f"{p}:{m}" for m in members], progress))


def _progress(total):
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415
    except ImportError:  # progress bars are a nicety, not a requirement
        return None
    return tqdm(total=total, desc="decoding FER-2013", unit="img")


# --------------------------------------------------------------------------- cache


def _cache_key(path: Path, fingerprint) -> str:
    h = hashlib.sha256()
    h.update(f"v{_CACHE_VERSION}\0{path}\0".encode())
    for rel, size, mtime in fingerprint:
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:32]


def _read_cache(file: Path) -> FERDataset | None:
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            return FERDataset(z["images"], z["labels"], z["usage"], tuple(z["class_names"].tolist()))
    except Exception as exc:  # a corrupt cache must never stop a load: decode again
        warnings.warn(f"ignoring unreadable cache file {file} ({exc}); decoding the source again", stacklevel=3)
        return None


# A temporary cache file older than this was left by a killed process (a write takes seconds).
_STALE_TMP_SECONDS = 3600


def _remove_stale_tmp(folder: Path) -> None:
    """Remove temporary cache files that killed loads left behind (never a recent one: it may be in use)."""
    import time  # noqa: PLC0415

    for tmp in folder.glob("fer2013-*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                tmp.unlink()
        except OSError:
            pass


def _write_cache(file: Path, ds: FERDataset) -> None:
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(file.parent)
        # Write to a temp file in the same folder then rename: readers never see
        # a half-written cache, even if two loads race.
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.stem + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                images=ds.images,
                labels=ds.labels,
                usage=ds.usage,
                class_names=np.array(ds.class_names, dtype=str),
            )
        os.replace(tmp, file)
    except OSError as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        warnings.warn(f"could not write the FER-2013 cache to {file} ({exc}); continuing without it", stacklevel=3)
