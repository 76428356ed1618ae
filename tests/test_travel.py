"""benchmarks/travel.py and benchmarks/gpu_train.sh: a run cut to the GPU machine's transfer limits and back.

gpu_train.sh runs here on the NumPy backend (GPU_TRAIN_BACKEND=numpy), on a tiny synthetic FER-2013 folder
of Training images only, exactly as it would on the device: a new run, its pieces unpacked here, then a
session that carries last.npz alone and resumes, a session stopped by its time limit, and the PublicTest
evaluation on this machine of the best.npz that came back.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
Image = pytest.importorskip("PIL.Image")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"minicnn_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


travel = _load("travel")
fer_subset = _load("fer_subset")
CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def write_fer(root: Path, with_test: bool):
    rng = np.random.default_rng(0)  # the same Training images in both folders
    for split, n in (("train", 12), ("test", 3)):
        if split == "test" and not with_test:
            continue
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = (rng.random((48, 48)) * 60 + 30 * c).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{split}_{c}{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("travel_data")
    return write_fer(base / "train_only", with_test=False), write_fer(base / "full", with_test=True)


def gpu_train(out, run, limit, data_dir, *train_args, cache):
    env = dict(os.environ, FER2013_DATA=str(data_dir), GPU_TRAIN_BACKEND="numpy", PYTHON=sys.executable,
               MINICNN_CACHE=str(cache))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_train.sh"), str(out), str(run), str(limit),
                           *train_args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "gpu_train.json").read_text())


def check_fits_the_device(out: Path):
    files = [p for p in out.iterdir() if p.is_file()]
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in files), files


NEW_RUN = ("--model", "hw3_dnn", "--epochs", "2", "--batch-size", "16", "--optimizer", "sgd", "--momentum", "0.9",
           "--augment", "khaireddin", "--schedule", "cosine")


def test_a_run_travels_back_resumes_from_last_npz_alone_and_is_evaluated_here(data, tmp_path, capsys):
    train_only, full = data
    cache = tmp_path / "cache"
    first = gpu_train(tmp_path / "out1", tmp_path / "device1", 600, train_only, *NEW_RUN, cache=cache)
    assert first["mode"] == "new" and first["train_exit_status"] == 0 and first["epochs_done"] == 2
    check_fits_the_device(tmp_path / "out1")
    assert "(124: stopped at the time limit" in (tmp_path / "out1" / "train.log").read_text()

    # Here: join the pieces (small pieces, to prove the joining, are cut by travel.pack directly below).
    local = tmp_path / "local"
    assert travel.main(["unpack", str(tmp_path / "out1"), str(local)]) == 0
    assert (local / "last.npz").read_bytes() == (tmp_path / "device1" / "last.npz").read_bytes()
    assert "unpacked" in capsys.readouterr().out

    # The next session carries last.npz.packed alone (smaller, bit-exact) and lengthens the run.
    assert travel.main(["carry", str(local)]) == 0
    assert "carry it to the GPU session" in capsys.readouterr().out
    device2 = tmp_path / "device2"
    device2.mkdir()
    shutil.copyfile(local / "last.npz.packed", device2 / "last.npz.packed")
    # ... and Training as the .tar.xz that travels (read as it is): the same images, so the same fingerprint.
    archive = tmp_path / "fer2013_train.tar.xz"
    fer_subset.pack_archive([(path, path.relative_to(train_only).as_posix())
                             for path in sorted((train_only / "train").rglob("*.png"))], archive)
    second = gpu_train(tmp_path / "out2", device2, 600, archive, "--epochs", "3", cache=cache)
    assert second["mode"] == "resume" and second["epochs_done"] == 3
    log = (tmp_path / "out2" / "train.log").read_text()
    assert "expanded" in log and "SHA-256 checked" in log
    assert "resumed from" in log and "after epoch 2" in log
    travel.unpack(tmp_path / "out2", local)
    assert [r["epoch"] for r in json.loads((local / "history.json").read_text())] == [1, 2, 3]
    assert (local / "best.npz").is_file()  # from the first session, or the second if epoch 3 was better

    # PublicTest, on this machine, of the best weights: the same Training images, so the same fingerprint.
    from minicnn.cli import evaluate  # noqa: PLC0415

    os.environ["MINICNN_CACHE"] = str(cache)
    try:
        rc = evaluate.main(["--checkpoint", str(local / "best.npz"), "--data", str(full), "--quiet"])
    finally:
        del os.environ["MINICNN_CACHE"]
    out = capsys.readouterr().out
    assert rc == 0, out
    assert json.loads(out)["num_examples"] == 3 * len(CLASSES)


def test_the_time_limit_stops_after_a_finished_epoch_and_the_run_still_packs(data, tmp_path):
    train_only, _ = data
    summary = gpu_train(tmp_path / "out", tmp_path / "run", 8, train_only, "--model", "hw3_dnn", "--epochs", "5000",
                        "--batch-size", "16", cache=tmp_path / "cache")
    assert summary["train_exit_status"] == 124  # SIGTERM from timeout; train.py stopped cleanly
    assert "interrupted" in (tmp_path / "out" / "train.log").read_text().lower()
    check_fits_the_device(tmp_path / "out")
    local = tmp_path / "local"
    travel.unpack(tmp_path / "out", local)
    from minicnn.training import load_checkpoint  # noqa: PLC0415

    _, _, meta = load_checkpoint(local / "last.npz")
    assert meta["epoch"] == summary.get("epochs_done", 0) < 5000


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder as train.py writes it: one epoch of hw3_dnn with SGD momentum on the tiny data."""
    from minicnn.cli import train  # noqa: PLC0415

    base = tmp_path_factory.mktemp("trained_run")
    data = write_fer(base / "data", with_test=False)
    run = base / "run"
    os.environ["MINICNN_CACHE"] = str(base / "cache")
    try:
        assert train.main(["--data", str(data), "--out", str(run), "--epochs", "1", "--model", "hw3_dnn",
                           "--optimizer", "sgd", "--momentum", "0.9", "--no-progress", "--no-test"]) == 0
    finally:
        del os.environ["MINICNN_CACHE"]
    return run


@pytest.fixture
def packed(trained_run, tmp_path):
    """A copy of ``trained_run`` (each test may damage it), packed in pieces of 1 MB."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    manifest = travel.pack(run, tmp_path / "out", piece_bytes=1_000_000)
    return run, tmp_path / "out", manifest


def test_pack_cuts_pieces_and_unpack_joins_them_exactly(packed, tmp_path):
    run, out, manifest = packed
    record = manifest["last.npz"]
    pieces = record["pieces"]
    assert record["bytes"] == (run / "last.npz").stat().st_size
    assert record["packed"]["bytes"] < 0.93 * record["bytes"]  # the byte planes compress; the raw file hardly
    assert len(pieces) == -(-record["packed"]["bytes"] // 1_000_000) > 1
    assert all(p["bytes"] <= 1_000_000 for p in pieces)
    assert all(p["name"].startswith("last.npz.packed.part") for p in pieces)
    assert not (out / "last.npz.packed").exists()  # only the pieces travel
    from minicnn.training import load_checkpoint  # noqa: PLC0415

    _, best_arrays, _ = load_checkpoint(out / "best.npz")
    assert not [k for k in best_arrays if k.startswith("optim/")]  # best.npz travels without optimiser state
    replaced = travel.unpack(out, tmp_path / "local")
    assert replaced == ["last.npz", "best.npz", "history.json"]
    assert (tmp_path / "local" / "last.npz").read_bytes() == (run / "last.npz").read_bytes()
    _, full_best, _ = load_checkpoint(run / "best.npz")
    for key, value in best_arrays.items():  # float32 export: the weights bit for bit
        np.testing.assert_array_equal(value, full_best[key])


@pytest.mark.parametrize("damage", ["flip", "missing", "truncated"])
def test_a_damaged_or_missing_piece_is_refused_by_name_and_nothing_is_replaced(packed, tmp_path, damage, capsys):
    _, out, manifest = packed
    local = tmp_path / "local"
    local.mkdir()
    (local / "last.npz").write_bytes(b"the previous session's checkpoint")
    piece = out / manifest["last.npz"]["pieces"][1]["name"]
    if damage == "missing":
        piece.unlink()
    else:
        data = bytearray(piece.read_bytes())
        if damage == "flip":
            data[10] ^= 0xFF
        else:
            data = data[:-1]
        piece.write_bytes(bytes(data))
    word = "missing" if damage == "missing" else "damaged"
    with pytest.raises(travel.TravelError, match=rf"last\.npz\.packed\.part01 is {word}"):
        travel.unpack(out, local)
    assert (local / "last.npz").read_bytes() == b"the previous session's checkpoint"
    assert sorted(p.name for p in local.iterdir()) == ["last.npz"]  # no temporary file left behind
    assert travel.main(["unpack", str(out), str(local)]) == 2
    assert "travel.py: " in capsys.readouterr().err


def test_unpack_without_a_manifest_and_pack_without_a_run_name_the_folder(tmp_path):
    with pytest.raises(travel.TravelError, match="travel.json does not exist"):
        travel.unpack(tmp_path, tmp_path / "local")
    (tmp_path / "travel.json").write_text("[1, 2]")
    with pytest.raises(travel.TravelError, match="is not a travel manifest"):
        travel.unpack(tmp_path, tmp_path / "local")
    with pytest.raises(travel.TravelError, match="last.npz does not exist"):
        travel.pack(tmp_path / "empty", tmp_path / "out")


@settings(max_examples=30, deadline=None)
@given(payload=st.binary(min_size=0, max_size=2000), piece=st.integers(1, 700))
def test_split_file_pieces_join_back_to_the_file(tmp_path_factory, payload, piece):
    folder = tmp_path_factory.mktemp("split")
    (folder / "blob").write_bytes(payload)
    pieces = travel.split_file(folder / "blob", folder, piece)
    assert len(pieces) == max(1, -(-len(payload) // piece))
    assert all(p["bytes"] <= piece for p in pieces)
    assert b"".join((folder / p["name"]).read_bytes() for p in pieces) == payload


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(min_size=0, max_size=300), planes=st.integers(1, 8))
def test_byte_planes_join_back_to_the_bytes(payload, planes):
    split = travel.split_planes(payload, planes)
    assert len(split) == len(payload)
    assert travel.join_planes(split, planes) == payload
    if len(payload) >= 2 * planes:  # the first plane holds byte 0 of every word
        assert split[: len(payload) // planes] == payload[: len(payload) // planes * planes : planes]


def test_an_older_manifest_without_packing_still_unpacks(packed, tmp_path):
    run, _, _ = packed
    old = tmp_path / "old"
    old.mkdir()
    last = run / "last.npz"
    (old / "travel.json").write_text(json.dumps({"last.npz": {
        "bytes": last.stat().st_size, "sha256": travel.sha256_of(last),
        "pieces": travel.split_file(last, old, 1_000_000)}}))
    assert travel.unpack(old, tmp_path / "local") == ["last.npz"]
    assert (tmp_path / "local" / "last.npz").read_bytes() == last.read_bytes()


def test_carry_and_expand_round_trip_and_never_overwrite_a_different_run(packed, tmp_path):
    run, _, _ = packed
    original = (run / "last.npz").read_bytes()
    packed_file = travel.carry(run)
    assert packed_file.name == "last.npz.packed" and packed_file.stat().st_size < 0.93 * len(original)
    device = tmp_path / "device"
    device.mkdir()
    shutil.copyfile(packed_file, device / "last.npz.packed")
    assert travel.expand(device).read_bytes() == original
    assert travel.expand(device).read_bytes() == original  # the same bytes again: nothing to do
    (device / "last.npz").write_bytes(b"a newer state of the run")
    with pytest.raises(travel.TravelError, match="last.npz exists and differs"):
        travel.expand(device)
    assert (device / "last.npz").read_bytes() == b"a newer state of the run"
    with pytest.raises(travel.TravelError, match="last.npz.packed does not exist"):
        travel.expand(tmp_path)
    with pytest.raises(travel.TravelError, match="holds no run to carry"):
        travel.carry(tmp_path)
    (tmp_path / "last.npz").write_bytes(b"not a zip")
    with pytest.raises(travel.TravelError, match="does not open as a checkpoint"):
        travel.carry(tmp_path)
    assert not (tmp_path / "last.npz.packed").exists()


@pytest.mark.parametrize("damage, message", [
    ("magic", "is not a packed file"),
    ("header", "damaged header line"),
    ("flip", "is damaged"),
    ("truncated", "is damaged"),
    ("sha", "should expand to"),
])
def test_a_damaged_packed_file_is_refused_by_name(packed, tmp_path, damage, message, capsys):
    run, _, _ = packed
    data = bytearray(travel.carry(run).read_bytes())
    header_end = data.index(b"\n", len(travel.PACKED_MAGIC))
    if damage == "magic":
        data[0:8] = b"PK\x03\x04...."
    elif damage == "header":
        data[len(travel.PACKED_MAGIC)] = ord("[")
    elif damage == "flip":
        data[header_end + 5000] ^= 0xFF
    elif damage == "truncated":
        del data[-100:]
    else:  # a well-formed file whose header promises other bytes
        header = json.loads(data[len(travel.PACKED_MAGIC):header_end])
        header["sha256"] = "0" * 64
        data[len(travel.PACKED_MAGIC):header_end] = json.dumps(header).encode()
    device = tmp_path / "device"
    device.mkdir()
    (device / "last.npz.packed").write_bytes(bytes(data))
    with pytest.raises(travel.TravelError, match=message) as info:
        travel.expand(device)
    assert "last.npz.packed" in str(info.value)
    assert sorted(p.name for p in device.iterdir()) == ["last.npz.packed"]  # nothing half-written
    assert travel.main(["expand", str(device)]) == 2
    assert "travel.py: " in capsys.readouterr().err


def test_a_missing_data_path_stops_the_session_before_anything_runs(tmp_path):
    env = dict(os.environ, FER2013_DATA=str(tmp_path / "typo.tar.xz"), GPU_TRAIN_BACKEND="numpy", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_train.sh"), str(tmp_path / "out"),
                           str(tmp_path / "run"), "60"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"FER2013_DATA={tmp_path / 'typo.tar.xz'}: no such file or folder" in proc.stderr
    assert not (tmp_path / "out" / "gpu_train.json").exists()
