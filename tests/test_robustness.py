"""Bad inputs and faults in the library: labels, layers, 16-bit images, checkpoints, divergence, signals.

Each test is one failure a user met (issue 10): a silently wrong number or a raw
traceback before the fix, a clear error naming the thing after it. The
scripts' side (train.py, evaluate.py) is in test_examples.py; the full fault
injection is benchmarks/fault_injection.py.
"""
import io
import json
import os
import signal
import zipfile

import numpy as np
import pytest

import minicnn
from minicnn.checkpoint import CheckpointError, inspect_npz, load_npz, save_npz, write_json
from minicnn.data import FERDataset, content_sample, load_fer2013, stratified_split, undersample
from minicnn.data.fer2013 import to_grey48
from minicnn.losses import MSELoss, SoftmaxCrossEntropy
from minicnn.training import Trainer, TrainingDiverged, load_checkpoint, save_checkpoint

from test_training import make_trainer, tiny_data, tiny_model

Image = pytest.importorskip("PIL.Image")


# --------------------------------------------------------------------------- labels (item 6)


@pytest.mark.parametrize("loss", [SoftmaxCrossEntropy(), SoftmaxCrossEntropy(label_smoothing=0.1), MSELoss()])
@pytest.mark.parametrize("labels, error, message", [
    ([0, -1, 2], ValueError, "label -1 is not a class index in 0..2"),  # -1 would silently read class 2
    ([0, 3, 2], ValueError, "label 3 is not a class index in 0..2"),
    ([0.0, 1.0, 2.0], TypeError, "labels must be integer class indices, got dtype float64"),
])
def test_losses_refuse_labels_that_are_not_class_indices(loss, labels, error, message):
    logits = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        loss.forward(logits, np.array(labels))


def test_trainer_fit_refuses_mismatched_lengths_and_float_labels(tmp_path):
    x, y = tiny_data(32)
    trainer = make_trainer(None)
    with pytest.raises(ValueError, match="32 inputs but 31 labels in y_train"):
        trainer.fit(x, y[:31], epochs=1, log=lambda *_: None)
    with pytest.raises(ValueError, match="y_train must hold integer class indices, got dtype float64"):
        trainer.fit(x, y + 0.7, epochs=1, log=lambda *_: None)  # was truncated to int silently
    with pytest.raises(ValueError, match="8 inputs but 7 labels in y_val"):
        trainer.fit(x, y, x[:8], y[:7], epochs=1, log=lambda *_: None)
    with pytest.raises(ValueError, match="holds label -1"):
        trainer.fit(x, np.where(y == 0, -1, y), epochs=1, log=lambda *_: None)
    with pytest.raises(ValueError, match="y_val holds label 3 but the network has 3 outputs"):
        trainer.fit(x, y, x[:8], np.full(8, 3), epochs=1, log=lambda *_: None)
    assert trainer.epoch == 0


# --------------------------------------------------------------------------- layers (item 6)


@pytest.mark.parametrize("layer, shape", [(minicnn.BatchNorm1D(3), (4, 3)), (minicnn.BatchNorm2D(3), (4, 3, 2, 2))])
def test_batchnorm_refuses_integer_input(layer, shape):
    x = np.arange(np.prod(shape)).reshape(shape)  # int64: normalised in integer arithmetic, it gave zeros
    for training in (True, False):
        with pytest.raises(TypeError, match="expects floating-point input, got dtype int64"):
            layer.forward(x, training=training)


@pytest.mark.parametrize("build, message", [
    (lambda: minicnn.Conv2D(0, 4, 3), r"Conv2D: in_channels must be a whole number >= 1, got 0"),
    (lambda: minicnn.Conv2D(1, 2.5, 3), r"Conv2D: out_channels must be a whole number >= 1, got 2.5"),
    (lambda: minicnn.Conv2D(1, 4, 2.7), r"kernel_size must be an int or a pair of ints, got 2.7"),
    (lambda: minicnn.Conv2D(1, 4, "a"), r"kernel_size must be an int or a pair of ints, got 'a'"),
    (lambda: minicnn.Conv2D(1, 4, (3, 3, 3)), r"kernel_size must be an int or a pair of ints, got \(3, 3, 3\)"),
    (lambda: minicnn.Conv2D(1, 4, 3, stride=True), r"stride must be an int or a pair of ints, got True"),
    (lambda: minicnn.Dense(0, 3), r"Dense: in_features must be a whole number >= 1, got 0"),
    (lambda: minicnn.Dense(4, -2), r"Dense: out_features must be a whole number >= 1, got -2"),
    (lambda: minicnn.MaxPool2D(0), r"MaxPool2D: kernel_size and stride must be >= 1, got kernel_size=\(0, 0\)"),
    (lambda: minicnn.MaxPool2D(2, stride=0), r"MaxPool2D: .*got kernel_size=\(2, 2\), stride=\(0, 0\)"),
    (lambda: minicnn.BatchNorm2D(0), r"BatchNorm2D: num_features must be a whole number >= 1, got 0"),
    (lambda: minicnn.BatchNorm1D(3, momentum=5), r"BatchNorm1D: momentum .* in \[0, 1\], got 5"),
    (lambda: minicnn.BatchNorm2D(3, eps=-1), r"BatchNorm2D: eps .* finite number > 0, got -1"),
    (lambda: minicnn.BatchNorm2D(3, eps=float("nan")), r"BatchNorm2D: eps .* got nan"),
    (lambda: minicnn.Dropout("a"), r"Dropout: p is the drop probability and must be a number in \[0, 1\), got 'a'"),
    (lambda: minicnn.Dropout(1.0), r"Dropout: p .* got 1.0"),
])
def test_layer_constructors_refuse_bad_sizes_naming_the_argument_and_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_layer_constructors_take_numpy_integers_and_pairs():
    conv = minicnn.Conv2D(np.int64(1), np.int32(4), (np.int64(3), 2), stride=[1, 1])
    assert conv.kernel_size == (3, 2) and conv.out_channels == 4 and type(conv.out_channels) is int
    assert minicnn.Dense(np.int64(6), 3).params["W"].shape == (6, 3)
    assert minicnn.BatchNorm2D(np.int16(3), momentum=np.float32(0.2)).momentum == pytest.approx(0.2)


@pytest.mark.parametrize("kernel, stride", [((17, 17), (1, 1)),  # the general path, 289 window positions
                                            ((1, 300), (1, 300)),  # the separable path, 300 columns per row
                                            ((300, 1), (300, 1))])
def test_maxpool_windows_of_more_than_256_positions(kernel, stride, float64):
    rng = np.random.default_rng(0)
    h, w = max(kernel[0], 18), max(kernel[1], 18)
    x = rng.permutation(2 * h * w).reshape(1, 2, h, w).astype(np.float64)  # no ties
    pool = minicnn.MaxPool2D(kernel, stride=stride)
    out = pool.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = pool.backward(dout)
    # Reference: each window's gradient goes to the position of its maximum.
    expected = np.zeros_like(x)
    for n, c, i, j in np.ndindex(*out.shape):
        win = x[n, c, i * stride[0]: i * stride[0] + kernel[0], j * stride[1]: j * stride[1] + kernel[1]]
        u, v = np.unravel_index(np.argmax(win), win.shape)
        assert out[n, c, i, j] == win[u, v]
        expected[n, c, i * stride[0] + u, j * stride[1] + v] += dout[n, c, i, j]
    np.testing.assert_array_equal(dx, expected)


# --------------------------------------------------------------------------- 16-bit images (item 6)


def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (48, 48)).astype(np.uint16)
    wide = grey * 257  # the same picture in 16 bits: 0..65535
    folder = tmp_path / "train" / "happy"
    folder.mkdir(parents=True)
    Image.fromarray(wide).save(folder / "a.png")
    with Image.open(folder / "a.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit image
        np.testing.assert_array_equal(to_grey48(im), grey)
    ds = load_fer2013(tmp_path, use_cache=False)
    np.testing.assert_array_equal(ds.images[0], grey)  # was all 255


# --------------------------------------------------------------------------- content-keyed splits (item 1)


def faces(n, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 48, 48), dtype=np.uint8)
    labels = np.arange(n) % classes
    return FERDataset(images, labels, np.full(n, "Training"))


def image_set(ds):
    return sorted((bytes(img), int(lab)) for img, lab in zip(ds.images, ds.labels))


def test_split_undersample_and_sample_do_not_depend_on_row_order():
    ds = faces(90)
    shuffled = ds.subset(np.random.default_rng(1).permutation(len(ds)))
    for seed in (0, 1):
        train_a, val_a = stratified_split(ds, 0.2, seed=seed)
        train_b, val_b = stratified_split(shuffled, 0.2, seed=seed)
        assert image_set(val_a) == image_set(val_b) and image_set(train_a) == image_set(train_b)
        assert image_set(undersample(ds, "angry", 10, seed)) == image_set(undersample(shuffled, "angry", 10, seed))
        assert image_set(content_sample(ds, 17, seed)) == image_set(content_sample(shuffled, 17, seed))
        assert ds.fingerprint() == shuffled.fingerprint()
    # The legacy split by row position does depend on the order (what users met with a shuffled CSV).
    assert image_set(stratified_split(ds, 0.2, method="order")[1]) != \
        image_set(stratified_split(shuffled, 0.2, method="order")[1])
    # Seeds still choose other images, and the fingerprint sees a single changed pixel.
    assert image_set(stratified_split(ds, 0.2, seed=0)[1]) != image_set(stratified_split(ds, 0.2, seed=1)[1])
    changed = ds.subset(np.arange(len(ds)))
    changed.images[3, 0, 0] ^= 1
    assert changed.fingerprint() != ds.fingerprint()


# --------------------------------------------------------------------------- divergence (item 4)


class Corrupt:
    """An augmenter hook that, during epoch ``epoch``, sets a BatchNorm statistic to ``value``."""

    def __init__(self, inner, model, epoch, value, buffer="running_var"):
        self.inner, self.model, self.epoch, self.value, self.buffer, self.current = inner, model, epoch, value, buffer, -1

    def reseed(self, seed):
        self.current += 1
        self.inner.reseed(seed)

    def __call__(self, x, training=True):
        if self.current == self.epoch:
            self.model.layers[1].buffers[self.buffer][0] = self.value
        return self.inner(x, training)


@pytest.mark.parametrize("buffer, value", [("running_var", np.inf), ("running_mean", np.nan)])
def test_non_finite_statistics_stop_training_before_a_checkpoint_is_written(tmp_path, buffer, value):
    x, y = tiny_data()
    xv, yv = tiny_data(32, seed=1)
    trainer = make_trainer(tmp_path)
    trainer.augmenter = Corrupt(trainer.augmenter, trainer.model, epoch=2, value=value, buffer=buffer)
    with pytest.raises(TrainingDiverged) as exc:
        trainer.fit(x, y, xv, yv, epochs=4, log=lambda *_: None)
    message = str(exc.value)
    assert "training diverged in epoch 3" in message and f"buffer/1.{buffer} hold NaN or infinite" in message
    assert f"{tmp_path / 'last.npz'} (after epoch 2)" in message
    last = load_npz(tmp_path / "last.npz")
    assert last[1]["epoch"] == 2 and all(np.isfinite(v).all() for v in last[0].values() if v.dtype.kind == "f")
    best_epoch = load_npz(tmp_path / "best.npz")[1]["epoch"]
    assert f"the best is {tmp_path / 'best.npz'} (epoch {best_epoch})" in message
    assert [h["epoch"] for h in json.loads((tmp_path / "history.json").read_text())] == [1, 2]


def test_a_nan_validation_loss_stops_training(tmp_path, monkeypatch):
    x, y = tiny_data()
    trainer = make_trainer(tmp_path)
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: (float("nan"), 0.1))
    with pytest.raises(TrainingDiverged, match=r"in epoch 1: the validation loss is nan.*after epoch 0"):
        trainer.fit(x, y, x[:16], y[:16], epochs=2, log=lambda *_: None)
    assert load_npz(tmp_path / "last.npz")[1]["epoch"] == 0 and not (tmp_path / "best.npz").exists()


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    model = tiny_model()
    model.layers[0].params["W"][0, 0, 0, 0] = np.nan
    with pytest.raises(CheckpointError, match=r"param/0\.W hold NaN or infinite"):
        save_checkpoint(tmp_path / "c.npz", model)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- signals and files (item 8)


class SendSigterm:
    """An augmenter hook that sends this process SIGTERM at step ``step`` of epoch ``epoch``."""

    def __init__(self, inner, epoch, step):
        self.inner, self.epoch, self.step, self.calls, self.current = inner, epoch, step, 0, -1

    def reseed(self, seed):
        self.current += 1
        self.calls = 0
        self.inner.reseed(seed)

    def __call__(self, x, training=True):
        self.calls += 1
        if self.current == self.epoch and self.calls == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.inner(x, training)


@pytest.fixture
def default_signal_handlers():
    """Python's own SIGINT and SIGTERM handlers, whatever the test runner was started with.

    A shell starts a background job (``cmd &``) with SIGINT ignored, and Python then keeps it ignored: Ctrl-C
    cannot reach such a process, so training rightly leaves that alone. These tests send the signals themselves,
    so they install the handlers an interactive run has, and put back what was there after.
    """
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes_identically(tmp_path, default_signal_handlers):
    x, y = tiny_data()
    xv, yv = tiny_data(32, seed=1)
    full = make_trainer(tmp_path / "full")
    full.fit(x, y, xv, yv, epochs=3, log=lambda *_: None)
    run = make_trainer(tmp_path / "run")
    run.augmenter = SendSigterm(run.augmenter, epoch=1, step=3)
    messages = []
    run.fit(x, y, xv, yv, epochs=3, log=messages.append)
    assert run.interrupted and "holds the state after epoch 1" in messages[-1]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is removed after fit
    resumed = make_trainer(tmp_path / "run", init_seed=5)
    resumed.fit(x, y, xv, yv, epochs=3, resume=True, log=lambda *_: None)
    for k, v in full.model.state_arrays().items():
        np.testing.assert_array_equal(resumed.model.state_arrays()[k], v, err_msg=k)


def test_interrupt_between_an_epoch_and_its_save_names_the_epoch_the_file_holds(tmp_path, monkeypatch):
    x, y = tiny_data()
    trainer = make_trainer(tmp_path)
    real_save = Trainer._save

    def save(self, name):
        if self.epoch == 2:
            raise KeyboardInterrupt
        return real_save(self, name)

    monkeypatch.setattr(Trainer, "_save", save)
    messages = []
    trainer.fit(x, y, epochs=3, log=messages.append)
    assert trainer.epoch == 2  # in memory: two epochs done
    assert "after epoch 2 but before it was saved" in messages[-1]
    assert "holds the state after epoch 1" in messages[-1]
    assert load_npz(tmp_path / "last.npz")[1]["epoch"] == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_an_epoch_is_saved_is_held_until_its_files_agree(tmp_path, monkeypatch, signum,
                                                                        default_signal_handlers):
    """A signal between last.npz and best.npz used to stop the save: best.npz then kept an older epoch for good
    (the history, which a resumed run trusts, already named the new one). Now all of the epoch is written."""
    x, y = tiny_data()
    xv, yv = tiny_data(32, seed=1)
    trainer = make_trainer(tmp_path)
    real_save = Trainer._save

    def save(self, name):
        path = real_save(self, name)
        if self.epoch == 1 and name == "last.npz":
            os.kill(os.getpid(), signum)  # arrives before best.npz and the history are written
        return path

    monkeypatch.setattr(Trainer, "_save", save)
    messages = []
    trainer.fit(x, y, xv, yv, epochs=3, log=messages.append)
    assert trainer.interrupted and trainer.epoch == 1
    assert any(m.startswith("epoch 1/3") for m in messages)  # the epoch's line was still printed
    assert "holds the state after epoch 1" in messages[-1]
    assert load_npz(tmp_path / "last.npz")[1]["epoch"] == 1
    assert load_npz(tmp_path / "best.npz")[1]["epoch"] == 1  # epoch 1 is the first, so the best
    assert [row["epoch"] for row in json.loads((tmp_path / "history.json").read_text())] == [1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


class ProcessDied(BaseException):
    """Stands in for a SIGKILL: nothing after it runs, no handler sees it."""


def test_a_kill_between_an_epochs_two_saves_never_loses_the_best_weights(tmp_path, monkeypatch):
    """A SIGKILL cannot be held. Dying after the epoch's first file and before its second must leave a run
    whose --resume ends with the uninterrupted run's best.npz (the old order, last.npz first, left a
    last.npz whose history named epoch 1 the best and no best.npz at all)."""
    x, y = tiny_data()
    xv, yv = tiny_data(32, seed=1)
    make_trainer(tmp_path / "reference").fit(x, y, xv, yv, epochs=1, log=lambda *_: None)
    real_save = Trainer._save
    saves_in_epoch_1 = []

    def save(self, name):
        if self.epoch == 1:
            saves_in_epoch_1.append(name)
            if len(saves_in_epoch_1) == 2:
                raise ProcessDied
        return real_save(self, name)

    monkeypatch.setattr(Trainer, "_save", save)
    with pytest.raises(ProcessDied):
        make_trainer(tmp_path / "run").fit(x, y, xv, yv, epochs=1, log=lambda *_: None)
    monkeypatch.setattr(Trainer, "_save", real_save)
    make_trainer(tmp_path / "run", init_seed=9).fit(x, y, xv, yv, epochs=1, resume=True, log=lambda *_: None)
    for name in ("best.npz", "last.npz"):
        ours, theirs = load_npz(tmp_path / "run" / name), load_npz(tmp_path / "reference" / name)
        assert ours[1]["epoch"] == theirs[1]["epoch"] == 1, name
        assert set(ours[0]) == set(theirs[0])
        for key in theirs[0]:
            np.testing.assert_array_equal(ours[0][key], theirs[0][key], err_msg=f"{name}: {key}")


def test_orphaned_temporary_files_are_removed_at_the_next_start(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    orphans = [tmp_path / ".last.npz.k1l2.tmp", tmp_path / ".history.json.zz.tmp"]
    for o in orphans:
        o.write_bytes(b"half a file")
    keep = tmp_path / "notes.tmp"
    keep.write_text("mine")
    x, y = tiny_data(32)
    messages = []
    make_trainer(tmp_path).fit(x, y, epochs=1, log=messages.append)
    assert not any(o.exists() for o in orphans) and keep.exists()
    assert any("removed 2 temporary file(s)" in m for m in messages)


def test_json_is_written_atomically_with_null_for_nan(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    write_json(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": "x"})
    assert "NaN" not in path.read_text() and json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": "x"}
    # A write that fails half-way leaves the previous file and no temporary file.
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        write_json(path, {"a": 1})
    assert json.loads(path.read_text())["c"] == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


# --------------------------------------------------------------------------- crafted checkpoints (item 9)


def npy_bytes(header: dict, payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def test_an_array_claiming_a_huge_shape_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("__meta__.npy", npy_bytes({"descr": "<U2", "fortran_order": False, "shape": ()}, "{}".encode("utf-32-le")))
        zf.writestr("param/w.npy", npy_bytes({"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)}))
    decoded = []
    monkeypatch.setattr(np.lib.format, "read_array", lambda *a, **k: decoded.append(1))
    with pytest.raises(CheckpointError, match=r"claims shape \(1000000, 1000000\) float64 .* holds only 0 bytes"):
        load_npz(path)
    assert decoded == []  # refused before any array was read


def test_arrays_over_the_size_limit_are_refused(tmp_path, monkeypatch):
    save_npz(tmp_path / "c.npz", {"a": np.zeros(1000)})
    monkeypatch.setattr(minicnn.checkpoint, "MAX_ARRAY_BYTES", 4000)
    with pytest.raises(CheckpointError, match="more than the 4,000 a minicnn checkpoint may hold"):
        inspect_npz(tmp_path / "c.npz")


@pytest.mark.parametrize("content, message", [
    (b"hello, this is a text file\n", "looks like a text file, starting 'hello"),
    (b"", "it is empty"),
    (b"\x80\x04\x95", "looks like a Python pickle"),
    (b"PK\x05\x06" + bytes(18), "it is an empty zip archive (an .npz with no arrays at all)"),  # np.savez(path)
    (bytes(64), "it starts with bytes b'\\x00\\x00"),
    ("caf\u00e9 au lait\n".encode(), "looks like a text file, starting 'caf\u00e9"),
])
def test_files_that_are_no_archive_are_described_as_what_they_are(tmp_path, content, message):
    path = tmp_path / "x.npz"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert message in str(exc.value) and "pickled data" not in str(exc.value)


@pytest.mark.parametrize("config, message", [
    ({"num_classes": 10**9}, "num_classes=1000000000 is outside 1..4096"),
    ({"num_classes": 7, "width": 3}, "has no option 'width'"),
    ({"num_classes": "7"}, "has type str"),
])
def test_model_configuration_is_validated_before_the_model_is_built(tmp_path, config, message, monkeypatch):
    model = minicnn.build_model("hw3_cnn")
    path = save_checkpoint(tmp_path / "c.npz", model)
    arrays, meta = load_npz(path)
    meta["model"]["config"] = config
    save_npz(path, arrays, meta)
    built = []
    monkeypatch.setattr(minicnn.models, "build_model", lambda *a, **k: built.append(a))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    assert built == []


def test_arrays_of_the_wrong_shape_are_refused_before_they_are_read(tmp_path, monkeypatch):
    model = tiny_model()
    arrays = dict(model.state_arrays())
    arrays["param/6.W"] = np.zeros((2, 2), dtype=np.float32)
    path = save_npz(tmp_path / "c.npz", arrays, {"format": "minicnn.model/1", "name": "tiny", "config": {}})
    read = []
    real = np.lib.format.read_array
    monkeypatch.setattr(np.lib.format, "read_array", lambda *a, **k: read.append(1) or real(*a, **k))
    with pytest.raises(CheckpointError, match=r"'param/6.W' has shape \(2, 2\), expected \(144, 3\)"):
        load_checkpoint(path, tiny_model())
    assert len(read) == 1  # only the small __meta__ entry


def test_a_checkpoint_with_non_finite_weights_is_refused_on_load(tmp_path):
    model = tiny_model()
    arrays = dict(model.state_arrays())
    arrays["buffer/1.running_var"] = np.full(4, np.inf, dtype=np.float32)
    path = save_npz(tmp_path / "c.npz", arrays, {"format": "minicnn.model/1", "name": "tiny", "config": {}})
    with pytest.raises(CheckpointError, match=r"buffer/1\.running_var hold NaN or infinite values"):
        load_checkpoint(path, tiny_model())
