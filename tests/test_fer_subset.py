"""benchmarks/fer_subset.py: the subset it keeps, and archives that unpack to the very same files."""
from __future__ import annotations

import hashlib
import importlib.util
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_fer_subset():
    spec = importlib.util.spec_from_file_location("minicnn_bench_fer_subset", ROOT / "benchmarks" / "fer_subset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fer_subset = _load_fer_subset()


def _fake_fer(root: Path, counts: dict[str, dict[str, int]]) -> dict[str, bytes]:
    """train/<class>/NNNNN.jpg and test/<class>/... of random bytes; returns {relative path: bytes}."""
    rng = np.random.default_rng(0)
    files = {}
    for split, per_class in counts.items():
        for label, n in per_class.items():
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                data = rng.integers(0, 256, int(rng.integers(200, 2000)), dtype=np.uint8).tobytes()
                (root / split / label / f"im{i:03d}.jpg").write_bytes(data)
                files[f"{split}/{label}/im{i:03d}.jpg"] = data
    return files


def test_the_subset_keeps_the_first_fraction_of_every_class_by_name(tmp_path):
    _fake_fer(tmp_path / "src", {"train": {"angry": 10, "happy": 3}, "test": {"angry": 4, "happy": 2}})
    kept = [rel for _, rel in fer_subset.select(tmp_path / "src", 0.25, 0.5)]
    assert kept == ["train/angry/im000.jpg", "train/angry/im001.jpg", "train/angry/im002.jpg",  # ceil(2.5)
                    "train/happy/im000.jpg",                                                  # ceil(0.75)
                    "test/angry/im000.jpg", "test/angry/im001.jpg", "test/happy/im000.jpg"]


def test_a_packed_archive_unpacks_to_byte_identical_files_and_is_reproducible(tmp_path):
    files = _fake_fer(tmp_path / "src", {"train": {"angry": 4, "sad": 5}, "test": {"sad": 3}})
    kept = fer_subset.select(tmp_path / "src", 1.0, 1.0)
    sha = fer_subset.pack_archive(kept, tmp_path / "a" / "fer.tar.xz")
    again = fer_subset.pack_archive(kept, tmp_path / "b" / "fer.tar.xz")
    assert sha == again == hashlib.sha256((tmp_path / "a" / "fer.tar.xz").read_bytes()).hexdigest()
    assert not list((tmp_path / "a").glob("*.tmp"))
    with tarfile.open(tmp_path / "a" / "fer.tar.xz", "r:xz") as tar:
        members = tar.getmembers()
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and m.isfile() for m in members)
        tar.extractall(tmp_path / "out", filter="data")
    unpacked = {str(p.relative_to(tmp_path / "out")): p.read_bytes()
                for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert unpacked == files


def test_the_command_line_packs_or_copies_by_the_destination_name(tmp_path, capsys):
    files = _fake_fer(tmp_path / "src", {"train": {"angry": 2}, "test": {"angry": 1}})
    fer_subset.main([str(tmp_path / "src"), str(tmp_path / "fer.tar.xz"), "--fraction", "1"])
    assert "packed 3 images" in capsys.readouterr().out
    assert tarfile.is_tarfile(tmp_path / "fer.tar.xz")
    fer_subset.main([str(tmp_path / "src"), str(tmp_path / "copy"), "--fraction", "1"])
    assert "copied 3 images" in capsys.readouterr().out
    assert {str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*.jpg")} == set(files)


def test_a_folder_that_is_not_fer2013_is_refused_by_name(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(SystemExit, match=r"test is not a folder; expected FER-2013"):
        fer_subset.select(tmp_path, 1.0, 1.0)
    with pytest.raises(SystemExit, match=r"--fraction must lie in \(0, 1\] and --test-fraction in \[0, 1\], got 0.0"):
        fer_subset.select(tmp_path, 0.0, 1.0)
    with pytest.raises(SystemExit, match=r"got 1.0 and 1.5"):
        fer_subset.select(tmp_path, 1.0, 1.5)


def test_test_fraction_zero_keeps_training_only_and_needs_no_test_folder(tmp_path):
    _fake_fer(tmp_path / "src", {"train": {"angry": 3, "happy": 2}})
    kept = [rel for _, rel in fer_subset.select(tmp_path / "src", 1.0, 0.0)]
    assert kept == ["train/angry/im000.jpg", "train/angry/im001.jpg", "train/angry/im002.jpg",
                    "train/happy/im000.jpg", "train/happy/im001.jpg"]
