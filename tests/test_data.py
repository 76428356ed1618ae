"""Tests of minicnn.data: loading (CSV and image folders), cache, preprocessing, minibatches.

All inputs are small synthetic files written to ``tmp_path``. The real FER-2013
folder is read only when ``FER2013_DATA`` points at it.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from minicnn.data import (
    CLASS_NAMES,
    DataError,
    FERDataset,
    Normalizer,
    iterate_minibatches,
    load_fer2013,
    merge_disgust_into_angry,
    stratified_split,
    undersample,
)
from minicnn.data import fer2013 as fer_module

# --------------------------------------------------------------------------- helpers


# The user's cache folder, read before the fixture below redirects it: the
# real-data test uses it so that only its first run pays for decoding.
USER_CACHE_DIR = fer_module.default_cache_dir()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache from these tests."""
    monkeypatch.setenv("MINICNN_CACHE", str(tmp_path / "default-cache"))


def random_faces(n, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, size=(n, 48, 48)).astype(np.uint8)


def csv_row_fields(image):
    return " ".join(str(int(v)) for v in np.asarray(image).ravel())


def write_kaggle_csv(path, images, labels, usages):
    lines = ["emotion,pixels,Usage"]
    lines += [f"{lab},{csv_row_fields(img)},{u}" for img, lab, u in zip(images, labels, usages)]
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def write_icml_csv(path, images, labels, usages):
    # The ICML copy puts Usage before pixels and has leading spaces in the header.
    lines = ["emotion, Usage, pixels"]
    lines += [f"{lab},{u},{csv_row_fields(img)}" for img, lab, u in zip(images, labels, usages)]
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def save_image(path, array):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def small_csv(tmp_path, n=8, seed=0):
    images = random_faces(n, seed)
    labels = np.arange(n) % 7
    usages = np.array(["Training", "PublicTest", "PrivateTest"])[np.arange(n) % 3]
    path = write_kaggle_csv(tmp_path / "fer2013.csv", images, labels, usages)
    return path, images, labels, usages


def make_dataset(labels, seed=0):
    """A dataset whose image k encodes k in its first two bytes (to track rows)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    images = np.zeros((n, 2, 2), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = np.arange(n) // 256
    return FERDataset(images, labels, np.full(n, "Training"), CLASS_NAMES)


def row_ids(ds):
    return ds.images[:, 0, 0].astype(np.int64) + 256 * ds.images[:, 0, 1].astype(np.int64)


# --------------------------------------------------------------------------- CSV formats


def test_kaggle_csv_loads_exactly(tmp_path):
    path, images, labels, usages = small_csv(tmp_path, n=9)
    ds = load_fer2013(path, use_cache=False)
    assert len(ds) == 9
    assert ds.images.dtype == np.uint8 and ds.images.shape == (9, 48, 48)
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.usage.tolist() == usages.tolist()
    assert ds.class_names == CLASS_NAMES
    assert len(ds.split("Training")) == 3
    assert ds.class_counts() == {name: int((labels == i).sum()) for i, name in enumerate(CLASS_NAMES)}


def test_icml_csv_with_leading_space_headers(tmp_path):
    images = random_faces(5, seed=1)
    labels = np.array([6, 5, 4, 3, 2])
    usages = np.array(["Training", "Training", "PublicTest", "PrivateTest", "Training"])
    path = write_icml_csv(tmp_path / "icml_face_data.csv", images, labels, usages)
    ds = load_fer2013(path, use_cache=False)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.usage.tolist() == usages.tolist()


def test_csv_without_usage_column_is_training(tmp_path):
    images = random_faces(3, seed=2)
    lines = ["emotion,pixels"] + [f"1,{csv_row_fields(im)}" for im in images]
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines) + "\n")
    ds = load_fer2013(path, use_cache=False)
    assert ds.usage.tolist() == ["Training"] * 3
    np.testing.assert_array_equal(ds.images, images)


# --------------------------------------------------------------------------- image folders


def test_image_folder_with_splits(tmp_path):
    root = tmp_path / "fer"
    faces = random_faces(6, seed=3)
    save_image(root / "train" / "angry" / "Training_1.png", faces[0])
    save_image(root / "train" / "Happiness" / "img_b.png", faces[1])  # alias, no prefix -> folder
    save_image(root / "test" / "surprise" / "PublicTest_7.png", faces[2])
    save_image(root / "test" / "Sad" / "other.png", faces[3])
    save_image(root / "val" / "neutral" / "v.png", faces[4])
    # The file-name prefix wins over the folder.
    save_image(root / "test" / "fear" / "PrivateTest_3.png", faces[5])
    (root / "train" / "angry" / "notes.txt").write_text("not an image")  # ignored

    ds = load_fer2013(root, use_cache=False)
    assert len(ds) == 6
    # Ordered by usage (Training, PublicTest, PrivateTest), then by path ("H" sorts before "a").
    assert ds.usage.tolist() == ["Training", "Training", "PublicTest", "PublicTest", "PrivateTest", "PrivateTest"]
    assert [CLASS_NAMES[i] for i in ds.labels] == ["happy", "angry", "sad", "surprise", "fear", "neutral"]
    np.testing.assert_array_equal(ds.images, faces[[1, 0, 3, 2, 5, 4]])  # PNG is lossless


def test_class_only_folder_and_jpeg(tmp_path):
    root = tmp_path / "faces"
    smooth = np.tile(np.linspace(0, 255, 48), (48, 1)).astype(np.uint8)  # JPEG-friendly content
    save_image(root / "Anger" / "a.jpg", smooth)
    save_image(root / "disgust" / "Training_5.jpeg", smooth.T)
    ds = load_fer2013(root, use_cache=False)
    assert ds.labels.tolist() == [0, 1]
    assert ds.usage.tolist() == ["Training", "Training"]
    assert ds.images.shape == (2, 48, 48) and ds.images.dtype == np.uint8
    assert np.abs(ds.images[0].astype(int) - smooth).mean() < 3  # lossy, but close
    assert np.abs(ds.images[1].astype(int) - smooth.T).mean() < 3


def test_root_named_like_a_split_gives_the_usage(tmp_path):
    root = tmp_path / "test"
    save_image(root / "happy" / "a.png", random_faces(1)[0])
    save_image(root / "happy" / "Training_9.png", random_faces(1)[0])  # the prefix still wins
    assert sorted(load_fer2013(root, use_cache=False).usage.tolist()) == ["PublicTest", "Training"]


def test_progress_bar_and_many_chunks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fer_module, "_DECODE_CHUNK", 2)  # several decoding tasks
    root = tmp_path / "faces"
    faces = random_faces(5, seed=13)
    for k, face in enumerate(faces):
        save_image(root / "neutral" / f"{k}.png", face)
    ds = load_fer2013(root, use_cache=False, progress=True)
    np.testing.assert_array_equal(ds.images, faces)
    assert "5/5" in capsys.readouterr().err


def test_colour_and_oversized_images_become_48x48_grey(tmp_path):
    root = tmp_path / "faces"
    rng = np.random.RandomState(4)
    rgb = rng.randint(0, 256, size=(48, 48, 3)).astype(np.uint8)
    big = rng.randint(0, 256, size=(64, 64)).astype(np.uint8)
    save_image(root / "happy" / "colour.png", rgb)
    save_image(root / "sad" / "big.png", big)
    ds = load_fer2013(root, use_cache=False)
    assert ds.images.shape == (2, 48, 48)
    expected_grey = np.asarray(Image.fromarray(rgb).convert("L"))
    expected_small = np.asarray(Image.fromarray(big).resize((48, 48), Image.BILINEAR))
    np.testing.assert_array_equal(ds.images[0], expected_grey)
    np.testing.assert_array_equal(ds.images[1], expected_small)


# --------------------------------------------------------------------------- errors


def _csv_with_row(tmp_path, bad_row_index, bad_line):
    """A CSV of 4 good rows with row ``bad_row_index`` (0-based) replaced by ``bad_line``."""
    images = random_faces(4, seed=5)
    lines = ["emotion,pixels,Usage"] + [f"0,{csv_row_fields(im)},Training" for im in images]
    lines[1 + bad_row_index] = bad_line
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = " ".join(["7"] * 2304)


@pytest.mark.parametrize(
    "row, line, fragments",
    [
        (1, "0," + " ".join(["1"] * 2303) + ",Training", ["row 2", "2303", "2304"]),
        (2, "0," + " ".join(["1"] * 2305) + ",Training", ["row 3", "2305"]),
        (3, "0,,Training", ["row 4", "found 0"]),
        (2, "0," + " ".join(["1"] * 100 + ["abc"] + ["1"] * 2203) + ",Training", ["row 3", "'abc'"]),
        (0, "0," + " ".join(["1.5"] * 2304) + ",Training", ["row 1", "'1.5'"]),
        (1, "0," + " ".join(["256"] + ["1"] * 2303) + ",Training", ["row 2", "256", "0..255"]),
        (1, "0," + " ".join(["-1"] + ["1"] * 2303) + ",Training", ["row 2", "-1"]),
        (0, f"7,{GOOD},Training", ["row 1", "'7'", "0..6"]),
        (2, f"-1,{GOOD},Training", ["row 3", "'-1'"]),
        (1, f"happy,{GOOD},Training", ["row 2", "'happy'"]),
        (3, f"0,{GOOD},Validation", ["row 4", "'Validation'"]),
    ],
)
def test_bad_csv_rows_name_the_row(tmp_path, row, line, fragments):
    path = _csv_with_row(tmp_path, row, line)
    with pytest.raises(DataError) as info:
        load_fer2013(path, use_cache=False)
    msg = str(info.value)
    assert "bad.csv" in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_csv_missing_columns(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("label,image\n0,1 2 3\n")
    with pytest.raises(DataError, match=r"expected columns \['emotion', 'pixels', 'Usage'\].*found \['label', 'image'\]"):
        load_fer2013(path, use_cache=False)


def test_csv_header_only_is_empty(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("emotion,pixels,Usage\n")
    with pytest.raises(DataError, match="empty"):
        load_fer2013(path, use_cache=False)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "zero.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="zero.csv.*empty"):
        load_fer2013(path, use_cache=False)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nowhere.*no such file"):
        load_fer2013(tmp_path / "nowhere", use_cache=False)


def test_unknown_class_folder(tmp_path):
    root = tmp_path / "faces"
    save_image(root / "train" / "happy" / "a.png", random_faces(1)[0])
    save_image(root / "train" / "bored" / "b.png", random_faces(1)[0])
    with pytest.raises(DataError, match="unknown class folder 'bored'"):
        load_fer2013(root, use_cache=False)


def test_unknown_folder_next_to_splits(tmp_path):
    root = tmp_path / "faces"
    save_image(root / "train" / "happy" / "a.png", random_faces(1)[0])
    save_image(root / "extras" / "happy" / "b.png", random_faces(1)[0])
    with pytest.raises(DataError, match="'extras'"):
        load_fer2013(root, use_cache=False)


def test_truncated_jpeg_names_the_file(tmp_path):
    root = tmp_path / "faces"
    good = save_image(root / "fear" / "good.jpg", random_faces(1)[0])
    data = good.read_bytes()
    (root / "fear" / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg"):
        load_fer2013(root, use_cache=False)


def test_garbage_image_names_the_file(tmp_path):
    root = tmp_path / "faces"
    save_image(root / "fear" / "good.png", random_faces(1)[0])
    (root / "fear" / "junk.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"junk\.png.*cannot read image"):
        load_fer2013(root, use_cache=False)


def test_folder_without_images_is_empty(tmp_path):
    root = tmp_path / "faces"
    (root / "train" / "happy").mkdir(parents=True)
    (root / "train" / "happy" / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no images"):
        load_fer2013(root, use_cache=False)


def test_folder_without_subfolders(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="flat.*no class or split"):
        load_fer2013(tmp_path / "flat", use_cache=False)


# --------------------------------------------------------------------------- archives of image folders


def faces_folder(root):
    """The image-folder layout of test_image_folder_with_splits, plus things every archive must ignore."""
    faces = random_faces(6, seed=3)
    save_image(root / "train" / "angry" / "Training_1.png", faces[0])
    save_image(root / "train" / "Happiness" / "img_b.png", faces[1])
    save_image(root / "test" / "surprise" / "PublicTest_7.png", faces[2])
    save_image(root / "test" / "Sad" / "other.png", faces[3])
    save_image(root / "val" / "neutral" / "v.png", faces[4])
    save_image(root / "test" / "fear" / "PrivateTest_3.png", faces[5])
    (root / "train" / "angry" / "notes.txt").write_text("not an image")
    (root / "train" / "angry" / "._Training_1.png").write_bytes(b"macOS resource fork, not an image")
    (root / "__MACOSX" / "train").mkdir(parents=True)
    (root / "__MACOSX" / "train" / "x.png").write_bytes(b"neither")
    return root


def pack(root, archive, arcname):
    """``root`` packed as ``archive`` (.zip or a tar with any compression), its paths under ``arcname``."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(root.rglob("*")):
                zf.write(path, (Path(arcname) / path.relative_to(root)).as_posix())
    else:
        mode = {".tar": "w", ".gz": "w:gz", ".xz": "w:xz", ".bz2": "w:bz2"}[archive.suffix]
        with tarfile.open(archive, mode) as tf:
            tf.add(root, arcname=arcname)
    return archive


def zip_of(archive, members: dict):
    """A zip written member by member: ``{name as stored: bytes}``."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return archive


def png_bytes(face):
    buf = io.BytesIO()
    Image.fromarray(face).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name, arcname", [("archive.zip", ""), ("fer.tar", "."), ("fer.tar.gz", "fer2013"),
                                           ("fer.tar.xz", "data/fer2013"), ("fer.tar.bz2", "")])
def test_archive_loads_as_its_folder(tmp_path, name, arcname):
    # Kaggle's archive.zip holds train/ and test/ at its top; other archives wrap them in folders.
    root = faces_folder(tmp_path / "fer")
    archive = pack(root, tmp_path / name, arcname)
    _assert_same(load_fer2013(archive, use_cache=False), load_fer2013(root, use_cache=False))
    assert len(load_fer2013(archive, use_cache=False)) == 6


def test_archive_of_class_folders_is_training_and_a_split_inside_a_wrapper_keeps_its_usage(tmp_path):
    faces = random_faces(2, seed=4)
    save_image(tmp_path / "test" / "happy" / "a.png", faces[0])
    save_image(tmp_path / "test" / "sad" / "b.png", faces[1])
    ds = load_fer2013(pack(tmp_path / "test", tmp_path / "t.zip", "faces/test"), use_cache=False)
    assert ds.usage.tolist() == ["PublicTest", "PublicTest"] and ds.labels.tolist() == [3, 4]
    np.testing.assert_array_equal(ds.images, faces)
    # Class folders at the top, or in a wrapper that names no split: Training.
    for name, arcname in (("top.zip", ""), ("wrapped.zip", "faces")):
        ds = load_fer2013(pack(tmp_path / "test", tmp_path / name, arcname), use_cache=False)
        assert ds.usage.tolist() == ["Training", "Training"] and ds.labels.tolist() == [3, 4]


def test_archive_member_paths_are_read_in_any_spelling(tmp_path):
    faces = random_faces(3, seed=5)
    # "./" and "//" (some zip tools), backslashes (old Windows zips), a stray image beside the wrapper folder
    archive = zip_of(tmp_path / "odd.zip", {"./fer2013/train/happy/a.png": png_bytes(faces[0]),
                                            "fer2013\\train\\sad\\b.png": png_bytes(faces[1]),
                                            "fer2013//test/fear/c.png": png_bytes(faces[2]),
                                            "preview.png": png_bytes(faces[0])})
    ds = load_fer2013(archive, use_cache=False)
    assert ds.labels.tolist() == [3, 4, 2] and ds.usage.tolist() == ["Training", "Training", "PublicTest"]
    np.testing.assert_array_equal(ds.images, faces)
    twice = zip_of(tmp_path / "twice.zip", {"train/happy/a.png": png_bytes(faces[0]),
                                            "./train/happy/a.png": png_bytes(faces[1])})
    with pytest.raises(DataError, match=r"twice\.zip: holds 'train/happy/a\.png' twice"):
        load_fer2013(twice, use_cache=False)


def test_tar_links_are_followed_as_the_folder_reader_follows_them(tmp_path):
    root = tmp_path / "fer"
    faces = random_faces(2, seed=6)
    save_image(root / "train" / "happy" / "a.png", faces[0])
    save_image(root / "train" / "sad" / "b.png", faces[1])
    os.link(root / "train" / "happy" / "a.png", root / "train" / "happy" / "hard.png")
    os.symlink("../sad/b.png", root / "train" / "happy" / "soft.png")
    archive = pack(root, tmp_path / "links.tar.gz", "")
    ds = load_fer2013(archive, use_cache=False)
    _assert_same(ds, load_fer2013(root, use_cache=False))
    assert len(ds) == 4
    (root / "train" / "sad" / "b.png").unlink()  # the symbolic link now points at nothing: named, not skipped
    (root / "train" / "happy" / "soft.png").unlink()
    os.symlink("../sad/gone.png", root / "train" / "happy" / "soft.png")
    with pytest.raises(DataError, match=r"dangling\.tar:train/happy/soft\.png: a link to '\.\./sad/gone\.png'"):
        load_fer2013(pack(root, tmp_path / "dangling.tar", ""), use_cache=False)


def test_archive_errors_name_the_member(tmp_path):
    root = tmp_path / "fer"
    save_image(root / "train" / "fear" / "good.png", random_faces(1)[0])
    (root / "train" / "fear" / "junk.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"bad\.zip:fer/train/fear/junk\.png: cannot read image"):
        load_fer2013(pack(root, tmp_path / "bad.zip", "fer"), use_cache=False)
    (root / "train" / "fear" / "junk.png").unlink()
    save_image(root / "train" / "bored" / "b.png", random_faces(1)[0])
    with pytest.raises(DataError, match=r"bored\.tar\.gz:train/bored: unknown class folder 'bored'"):
        load_fer2013(pack(root, tmp_path / "bored.tar.gz", ""), use_cache=False)
    # a folder of other files next to the split folders: refused, as on disk
    (root / "train" / "bored" / "b.png").unlink()
    (root / "train" / "bored").rmdir()
    (root / "docs").mkdir()
    (root / "docs" / "README.txt").write_text("about")
    with pytest.raises(DataError, match=r"unexpected folder 'docs' next to split folders"):
        load_fer2013(root, use_cache=False)
    with pytest.raises(DataError, match=r"docs\.zip:docs: unexpected folder 'docs' next to split folders"):
        load_fer2013(pack(root, tmp_path / "docs.zip", ""), use_cache=False)


def test_archive_without_images_says_so_and_a_zipped_csv_is_read(tmp_path):
    (tmp_path / "empty" / "train" / "happy").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "happy" / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match=r"empty\.zip: an archive with no image files in it .* 3 other entries"):
        load_fer2013(pack(tmp_path / "empty", tmp_path / "empty.zip", ""), use_cache=False)
    path, images, labels, usages = small_csv(tmp_path, n=5)
    for name in ("fer2013.zip", "fer2013.tar.gz"):
        archive = tmp_path / name
        if name.endswith(".zip"):
            zip_of(archive, {"fer2013.csv": path.read_bytes()})
        else:
            with tarfile.open(archive, "w:gz") as tf:
                tf.add(path, arcname="fer2013.csv")
        ds = load_fer2013(archive, use_cache=False)
        np.testing.assert_array_equal(ds.images, images)
        assert ds.labels.tolist() == labels.tolist() and ds.usage.tolist() == usages.tolist()


def test_damaged_or_unreadable_archives_are_named(tmp_path, monkeypatch):
    root = faces_folder(tmp_path / "fer")
    cases = []
    for name in ("fer.tar.xz", "fer.zip", "fer.tar.gz"):
        whole = pack(root, tmp_path / f"whole_{name}", "").read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(whole[: len(whole) // 2])  # still starts like its kind, ends too soon
        cases.append(cut)
        flipped = bytearray(whole)
        for i in range(len(whole) // 3, len(whole) // 3 + 64):  # garbage in the middle of the compressed data
            flipped[i] ^= 0x5A
        bad = tmp_path / f"bad_{name}"
        bad.write_bytes(bytes(flipped))
        cases.append(bad)
    for archive in cases:
        with pytest.raises(DataError, match=rf"{re.escape(archive.name)}(: damaged archive|:\S+: cannot read image)"):
            load_fer2013(archive, use_cache=False)
    # what zipfile cannot open (an encrypted member here) is named, with what to do
    def encrypted(self, *args, **kwargs):
        raise RuntimeError("File 'train/angry/Training_1.png' is encrypted, password required for extraction")

    monkeypatch.setattr(zipfile.ZipFile, "open", encrypted)
    with pytest.raises(DataError, match=r"whole_fer\.zip: an archive this reader cannot open .* pass the folder"):
        load_fer2013(tmp_path / "whole_fer.zip", use_cache=False)


@pytest.mark.parametrize("name", ["big.zip", "big.tar.gz"])
def test_archive_refuses_an_oversized_member_or_total_before_reading_it_all(tmp_path, monkeypatch, name):
    save_image(tmp_path / "fer" / "happy" / "a.png", random_faces(1)[0])
    save_image(tmp_path / "fer" / "happy" / "b.png", random_faces(1, seed=1)[0])
    archive = pack(tmp_path / "fer", tmp_path / name, "")
    size = (tmp_path / "fer" / "happy" / "a.png").stat().st_size
    monkeypatch.setattr(fer_module, "_MAX_ARCHIVE_MEMBER_BYTES", size - 1)
    expected = rf"{name}:happy/a\.png: an image of more than {size - 1:,} bytes"
    with pytest.raises(DataError, match=expected):
        load_fer2013(archive, use_cache=False)
    monkeypatch.setattr(fer_module, "_MAX_ARCHIVE_MEMBER_BYTES", size + 10)
    monkeypatch.setattr(fer_module, "_MAX_ARCHIVE_TOTAL_BYTES", size + 10)
    with pytest.raises(DataError, match=rf"{name}: its images add up to more than {size + 10:,} bytes \(at happy/b"):
        load_fer2013(archive, use_cache=False)
    monkeypatch.setattr(fer_module, "_MAX_ARCHIVE_TOTAL_BYTES", 4 * size)
    assert len(load_fer2013(archive, use_cache=False)) == 2


def test_archive_cache_round_trip_and_invalidation(tmp_path, monkeypatch):
    root = faces_folder(tmp_path / "fer")
    archive = pack(root, tmp_path / "fer.zip", "")
    cache = tmp_path / "cache"
    first = load_fer2013(archive, cache_dir=cache)
    with monkeypatch.context() as m:
        _forbid_decoding(m)
        _assert_same(first, load_fer2013(archive, cache_dir=cache))
    save_image(root / "train" / "fear" / "d.png", random_faces(1)[0])
    pack(root, archive, "")  # rewritten: new size and mtime
    assert len(load_fer2013(archive, cache_dir=cache)) == 7


# --------------------------------------------------------------------------- cache


def _forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the source was decoded again instead of read from the cache")

    monkeypatch.setattr(fer_module, "_load_uncached", fail)


def _assert_same(a, b):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.usage.tolist() == b.usage.tolist()
    assert a.class_names == b.class_names
    assert a.images.dtype == b.images.dtype and a.labels.dtype == b.labels.dtype


def test_csv_cache_round_trip(tmp_path, monkeypatch):
    path, *_ = small_csv(tmp_path)
    cache = tmp_path / "cache"
    first = load_fer2013(path, cache_dir=cache)
    assert len(list(cache.glob("fer2013-*.npz"))) == 1
    assert not list(cache.glob("*.tmp"))  # the atomic write left no temp file
    _forbid_decoding(monkeypatch)
    second = load_fer2013(path, cache_dir=cache)
    _assert_same(first, second)


def test_folder_cache_round_trip_and_invalidation(tmp_path, monkeypatch):
    root = tmp_path / "faces"
    faces = random_faces(3, seed=6)
    save_image(root / "train" / "happy" / "a.png", faces[0])
    save_image(root / "train" / "sad" / "b.png", faces[1])
    target = save_image(root / "test" / "angry" / "c.png", faces[2])
    cache = tmp_path / "cache"
    first = load_fer2013(root, cache_dir=cache)

    with monkeypatch.context() as m:
        _forbid_decoding(m)
        _assert_same(first, load_fer2013(root, cache_dir=cache))

    # Change one image (new content, new mtime): the cache must not be served.
    new_face = 255 - faces[2]
    save_image(target, new_face)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = load_fer2013(root, cache_dir=cache)
    np.testing.assert_array_equal(changed.images[changed.usage == "PublicTest"][0], new_face)

    # A new file invalidates too.
    save_image(root / "train" / "fear" / "d.png", faces[0])
    assert len(load_fer2013(root, cache_dir=cache)) == 4


def test_csv_change_invalidates_cache(tmp_path):
    path, images, labels, usages = small_csv(tmp_path, n=4)
    cache = tmp_path / "cache"
    assert len(load_fer2013(path, cache_dir=cache)) == 4
    write_kaggle_csv(path, images[:3], labels[:3], usages[:3])
    assert len(load_fer2013(path, cache_dir=cache)) == 3


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    path, *_ = small_csv(tmp_path)
    monkeypatch.setenv("MINICNN_CACHE", str(tmp_path / "envcache"))
    load_fer2013(path)
    assert len(list((tmp_path / "envcache").glob("fer2013-*.npz"))) == 1


def test_use_cache_false_writes_nothing(tmp_path):
    path, *_ = small_csv(tmp_path)
    load_fer2013(path, cache_dir=tmp_path / "cache", use_cache=False)
    assert not (tmp_path / "cache").exists()


def test_unwritable_cache_warns_and_loads(tmp_path):
    path, images, *_ = small_csv(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not write the FER-2013 cache"):
        ds = load_fer2013(path, cache_dir=blocker / "sub")
    np.testing.assert_array_equal(ds.images, images)


def test_corrupt_cache_is_replaced(tmp_path):
    path, images, *_ = small_csv(tmp_path)
    cache = tmp_path / "cache"
    load_fer2013(path, cache_dir=cache)
    (cache_file,) = cache.glob("fer2013-*.npz")
    cache_file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache"):
        ds = load_fer2013(path, cache_dir=cache)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(load_fer2013(path, cache_dir=cache).images, images)  # rewritten, no warning


# --------------------------------------------------------------------------- FERDataset


def test_dataset_subset_split_counts():
    ds = make_dataset([0, 1, 1, 3, 6, 6, 6])
    ds.usage[:] = ["Training", "PublicTest", "Training", "PrivateTest", "Training", "PublicTest", "Training"]
    assert len(ds) == 7
    assert row_ids(ds.subset([6, 0])).tolist() == [6, 0]
    assert row_ids(ds.subset(ds.labels == 6)).tolist() == [4, 5, 6]
    assert row_ids(ds.split("PublicTest")).tolist() == [1, 5]
    assert ds.class_counts() == {"angry": 1, "disgust": 2, "fear": 0, "happy": 1, "sad": 0, "surprise": 0, "neutral": 3}
    with pytest.raises(ValueError, match="unknown usage"):
        ds.split("Validation")
    with pytest.raises(ValueError, match="boolean mask"):
        ds.subset(np.ones(3, dtype=bool))


def test_dataset_validates_fields():
    with pytest.raises(ValueError, match="uint8"):
        FERDataset(np.zeros((2, 48, 48), np.float32), np.zeros(2), np.array(["Training"] * 2))
    with pytest.raises(ValueError, match="same length"):
        FERDataset(np.zeros((2, 48, 48), np.uint8), np.zeros(3), np.array(["Training"] * 2))
    with pytest.raises(ValueError, match="labels must lie"):
        FERDataset(np.zeros((1, 48, 48), np.uint8), np.array([7]), np.array(["Training"]))


# --------------------------------------------------------------------------- preprocessing


def test_merge_disgust_into_angry():
    ds = make_dataset([0, 1, 2, 3, 4, 5, 6, 1])
    merged = merge_disgust_into_angry(ds)
    assert merged.class_names == ("angry", "fear", "happy", "sad", "surprise", "neutral")
    assert merged.labels.tolist() == [0, 0, 1, 2, 3, 4, 5, 0]
    assert merged.class_counts()["angry"] == 3
    np.testing.assert_array_equal(merged.images, ds.images)
    assert ds.labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 1]  # input untouched
    with pytest.raises(ValueError, match="disgust"):
        merge_disgust_into_angry(merged)


def test_undersample_keeps_count_and_others():
    labels = np.array([3] * 50 + [0] * 10 + [3] * 50 + [6] * 5)
    ds = make_dataset(labels)
    out = undersample(ds, "happy", 40, seed=1)
    assert out.class_counts()["happy"] == 40
    assert out.class_counts()["angry"] == 10 and out.class_counts()["neutral"] == 5
    ids = row_ids(out)
    assert np.all(np.diff(ids) > 0)  # original order kept
    assert set(np.flatnonzero(labels != 3)) <= set(ids.tolist())  # other classes all kept
    # Deterministic under the seed, different under another seed.
    np.testing.assert_array_equal(row_ids(undersample(ds, "happy", 40, seed=1)), ids)
    assert not np.array_equal(row_ids(undersample(ds, "happy", 40, seed=2)), ids)
    # A fraction keeps round(fraction * count).
    assert undersample(ds, "happy", 0.25, seed=0).class_counts()["happy"] == 25
    assert undersample(ds, "happy", 1.0, seed=0).class_counts()["happy"] == 100
    with pytest.raises(ValueError, match="cannot keep 101"):
        undersample(ds, "happy", 101, seed=0)
    with pytest.raises(ValueError, match="unknown class"):
        undersample(ds, "joy", 1, seed=0)
    with pytest.raises(TypeError):
        undersample(ds, "happy", True, seed=0)


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 6), min_size=1, max_size=300),
    frac=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**31 - 1),
)
def test_stratified_split_properties(labels, frac, seed):
    ds = make_dataset(labels)
    train, val = stratified_split(ds, frac, seed=seed)
    ids_t, ids_v = row_ids(train), row_ids(val)
    # A partition of the rows, each part in the original order.
    assert sorted(ids_t.tolist() + ids_v.tolist()) == list(range(len(labels)))
    assert np.all(np.diff(ids_t) > 0) and np.all(np.diff(ids_v) > 0)
    # Per-class proportions preserved to within rounding.
    for c in range(7):
        n_c = int((ds.labels == c).sum())
        assert abs(int((val.labels == c).sum()) - frac * n_c) <= 0.5 + 1e-9
    # Deterministic under the seed.
    _, val2 = stratified_split(ds, frac, seed=seed)
    np.testing.assert_array_equal(row_ids(val2), ids_v)


def test_stratified_split_seed_matters_and_validates():
    ds = make_dataset(np.arange(700) % 7)
    _, a = stratified_split(ds, 0.2, seed=0)
    _, b = stratified_split(ds, 0.2, seed=1)
    assert len(a) == len(b) == 140
    assert not np.array_equal(row_ids(a), row_ids(b))
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            stratified_split(ds, bad, seed=0)


def test_normalizer_per_pixel():
    train = random_faces(50, seed=7)
    test = random_faces(20, seed=8)
    norm = Normalizer("per_pixel").fit(train)
    x = norm.transform(train)
    assert x.shape == (50, 1, 48, 48) and x.dtype == np.float32
    assert np.abs(x).max() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
    # Test images use the training statistics, not their own.
    mean = train.astype(np.float64).mean(axis=0)
    scale = np.abs(train - mean).max()
    np.testing.assert_allclose(norm.transform(test)[:, 0], (test - mean) / scale, atol=1e-5)
    # (N, 1, H, W) input gives the same result.
    np.testing.assert_array_equal(norm.transform(test[:, None]), norm.transform(test))


def test_normalizer_mean_std():
    train = random_faces(40, seed=9) // 2  # not centred on 0.5, so mean/std really matter
    test = random_faces(10, seed=10)
    norm = Normalizer("mean_std").fit(train)
    x = norm.transform(train)
    assert x.dtype == np.float32 and x.shape == (40, 1, 48, 48)
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(x.std()) == pytest.approx(1.0, abs=1e-4)
    t = train / 255.0
    np.testing.assert_allclose(norm.transform(test)[:, 0], (test / 255.0 - t.mean()) / t.std(), atol=1e-5)


@pytest.mark.parametrize("mode", Normalizer.MODES)
def test_normalizer_round_trip_through_npz(tmp_path, mode):
    train = random_faces(30, seed=11)
    test = random_faces(5, seed=12)
    norm = Normalizer(mode).fit(train)
    arrays = norm.to_arrays(prefix="norm/")
    assert set(arrays) == {"norm/mode", "norm/mean", "norm/scale"}
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())
    np.savez(tmp_path / "ckpt.npz", weights=np.ones(3), **arrays)
    with np.load(tmp_path / "ckpt.npz", allow_pickle=False) as z:
        restored = Normalizer.from_arrays(z, prefix="norm/")
    assert restored.mode == mode
    np.testing.assert_array_equal(restored.transform(test), norm.transform(test))


def test_normalizer_errors():
    with pytest.raises(ValueError, match="unknown normalisation mode"):
        Normalizer("zscore")
    with pytest.raises(RuntimeError, match="before fit"):
        Normalizer().transform(random_faces(1))
    norm = Normalizer().fit(random_faces(3))
    with pytest.raises(ValueError, match="fitted on"):
        norm.transform(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(KeyError, match="prefix"):
        Normalizer.from_arrays(norm.to_arrays(), prefix="other/")


# --------------------------------------------------------------------------- minibatches


def test_minibatches_in_order_without_shuffle():
    x = np.arange(10)[:, None] * np.ones((1, 3))
    y = np.arange(10)
    batches = list(iterate_minibatches(x, y, 4, shuffle=False))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert np.shares_memory(batches[0][0], x)  # plain slices, no copies
    assert [b[1].tolist() for b in iterate_minibatches(x, y, 4, shuffle=False, drop_last=True)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]


def test_minibatches_shuffle_is_a_seeded_permutation():
    x = np.arange(23) * 10
    y = np.arange(23)
    run = lambda seed: list(iterate_minibatches(x, y, 5, rng=np.random.RandomState(seed)))  # noqa: E731
    batches = run(0)
    assert [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    seen = np.concatenate([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(23)) and seen.tolist() != list(range(23))
    for xb, yb in batches:
        np.testing.assert_array_equal(xb, yb * 10)  # x and y stay paired
    assert [b[1].tolist() for b in run(0)] == [b[1].tolist() for b in batches]
    assert [b[1].tolist() for b in run(1)] != [b[1].tolist() for b in batches]
    assert sum(len(b[1]) for b in iterate_minibatches(x, y, 5, rng=np.random.RandomState(0), drop_last=True)) == 20


def test_minibatches_validate():
    with pytest.raises(ValueError, match="differ in length"):
        list(iterate_minibatches(np.zeros(3), np.zeros(4), 2))
    with pytest.raises(ValueError, match="positive int"):
        list(iterate_minibatches(np.zeros(3), np.zeros(3), 0))
    assert [yb for _, yb in iterate_minibatches(np.zeros(3), None, 2, shuffle=False)] == [None, None]


# --------------------------------------------------------------------------- real data


REAL = os.environ.get("FER2013_DATA")


@pytest.mark.skipif(not REAL, reason="set FER2013_DATA to the FER-2013 image folder to test on the real data")
def test_real_fer2013_counts():
    ds = load_fer2013(REAL, cache_dir=USER_CACHE_DIR)
    train, test = ds.split("Training"), ds.split("PublicTest")
    assert len(train) == 28709 and len(test) == 3589 and len(ds) == 28709 + 3589
    assert ds.images.shape[1:] == (48, 48)
    assert list(train.class_counts().values()) == [3995, 436, 4097, 7215, 4830, 3171, 4965]
    assert list(test.class_counts().values()) == [467, 56, 496, 895, 653, 415, 607]
