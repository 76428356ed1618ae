"""The training loop: exact resume, Ctrl-C, NaN guard, early stopping, files written, and real learning."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import minicnn
from minicnn.checkpoint import CheckpointError, load_npz, save_npz
from minicnn.data import Augmenter
from minicnn.optim import Adam, make_schedule
from minicnn.training import Trainer, TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]


def tiny_model():
    return minicnn.Sequential([
        minicnn.Conv2D(1, 4, 3, padding=1), minicnn.BatchNorm2D(4), minicnn.LeakyReLU(), minicnn.MaxPool2D(2),
        minicnn.Dropout(0.2), minicnn.Flatten(), minicnn.Dense(4 * 6 * 6, 3),
    ], input_shape=(1, 12, 12), name="tiny")


def tiny_data(n=96, seed=0):
    """Three learnable classes: a bright blob on the left, the right, or nowhere."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.standard_normal((n, 1, 12, 12)).astype(np.float32) * 0.3
    x[y == 0, :, 3:9, 0:4] += 2.0
    x[y == 1, :, 3:9, 8:12] += 2.0
    return x, y


def make_trainer(out_dir, init_seed=0, **kw):
    minicnn.seed(init_seed)  # different init seeds prove that resume restores the weights
    model = tiny_model()
    opt = Adam(model, lr=0.01)
    schedule = make_schedule("plateau", opt, patience=1, factor=0.5)
    aug = Augmenter(flip=True, shift=0.1, rotation=10, seed=5)
    return Trainer(model, opt, schedule=schedule, augmenter=aug, batch_size=16, seed=3, out_dir=out_dir,
                   progress=False, log_every=2, **kw)


def assert_same_state(a, b):
    for (k, va), (_, vb) in zip(sorted(a.state_arrays().items()), sorted(b.state_arrays().items())):
        np.testing.assert_array_equal(va, vb, err_msg=k)


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    x, y = tiny_data()
    xv, yv = tiny_data(32, seed=1)
    full = make_trainer(tmp_path / "full")
    full.fit(x, y, xv, yv, epochs=4, log=lambda *_: None)

    first = make_trainer(tmp_path / "split")
    first.fit(x, y, xv, yv, epochs=2, log=lambda *_: None)
    second = make_trainer(tmp_path / "split", init_seed=99)
    second.fit(x, y, xv, yv, epochs=4, resume=True, log=lambda *_: None)

    assert second.epoch == 4 and len(second.history) == 4
    assert_same_state(full.model, second.model)
    assert second.optimizer.lr == full.optimizer.lr
    for h_full, h_split in zip(full.history, second.history):
        assert h_full["train_loss"] == h_split["train_loss"] and h_full["val_acc"] == h_split["val_acc"]


def test_training_writes_checkpoints_and_history(tmp_path):
    x, y = tiny_data()
    trainer = make_trainer(tmp_path)
    history = trainer.fit(x, y, *tiny_data(32, 1), epochs=3, log=lambda *_: None)
    assert {p.name for p in tmp_path.iterdir()} >= {"last.npz", "best.npz", "history.csv", "history.json"}
    assert json.loads((tmp_path / "history.json").read_text()) == history
    assert (tmp_path / "history.csv").read_text().splitlines()[0].startswith("epoch,train_loss,train_acc")
    arrays, meta = load_npz(tmp_path / "last.npz")
    assert meta["epoch"] == 3 and any(k.startswith("optim/") for k in arrays)
    best_epoch = max(history, key=lambda h: h["val_acc"])["epoch"]
    assert load_npz(tmp_path / "best.npz")[1]["epoch"] == best_epoch
    assert history[-1]["train_acc"] > 0.6  # the tiny task is learnable


def test_export_for_inference_drops_optimiser_state_and_still_loads(tmp_path):
    from minicnn.training import export_for_inference, load_checkpoint

    x, y = tiny_data()
    trainer = make_trainer(tmp_path, extra_meta={"class_names": ["a", "b", "c"]},
                           extra_arrays={"data/norm/mean": np.zeros(3, np.float32)})
    trainer.fit(x, y, epochs=1, log=lambda *_: None)
    out = export_for_inference(tmp_path / "last.npz", tmp_path / "export.npz")
    arrays, meta = load_npz(out)
    assert not any(k.startswith("optim/") for k in arrays) and "data/norm/mean" in arrays
    assert meta["class_names"] == ["a", "b", "c"] and meta["epoch"] == 1
    assert out.stat().st_size < (tmp_path / "last.npz").stat().st_size
    model = tiny_model()
    load_checkpoint(out, model)
    assert_same_state(model, trainer.model)
    with pytest.raises(ValueError, match="optimiser state"):
        load_checkpoint(out, tiny_model(), optimizer=Adam(tiny_model()))


def test_a_float16_export_halves_the_file_and_loads_as_the_rounded_float32_weights(tmp_path):
    from minicnn.training import export_for_inference, load_checkpoint

    trainer = make_trainer(tmp_path)
    trainer.fit(*tiny_data(), epochs=1, log=lambda *_: None)
    full = export_for_inference(tmp_path / "last.npz", tmp_path / "f32.npz")
    half = export_for_inference(tmp_path / "last.npz", tmp_path / "f16.npz", dtype=np.float16)
    arrays, meta = load_npz(half)
    weights = [k for k in arrays if k.startswith(("param/", "buffer/")) and arrays[k].dtype.kind == "f"]
    assert weights and all(arrays[k].dtype == np.float16 for k in weights) and meta["exported_dtype"] == "float16"
    full_arrays, _ = load_npz(full)  # (the tiny model's file is mostly its JSON record, so compare the arrays)
    assert 2 * sum(arrays[k].nbytes for k in weights) == sum(full_arrays[k].nbytes for k in weights)
    assert half.stat().st_size < full.stat().st_size
    model = tiny_model()
    load_checkpoint(half, model)  # computes in float32 again, with the stored (rounded) values
    for key, value in model.state_arrays().items():
        expected = trainer.model.state_arrays()[key]
        assert value.dtype == expected.dtype
        np.testing.assert_array_equal(value, expected.astype(np.float16).astype(expected.dtype))


def test_an_export_refuses_weights_beyond_float16s_range_naming_the_array(tmp_path):
    from minicnn.training import export_for_inference

    trainer = make_trainer(tmp_path)
    trainer.fit(*tiny_data(), epochs=1, log=lambda *_: None)
    arrays, meta = load_npz(tmp_path / "last.npz")
    key = next(k for k in arrays if k.startswith("param/"))
    arrays[key] = arrays[key] + np.float32(1e5)  # finite in float32, infinite in float16
    save_npz(tmp_path / "big.npz", arrays, meta)
    with pytest.raises(CheckpointError, match=rf"{key} holds values up to 1e\+05, beyond float16's largest 6\.55e\+04"):
        export_for_inference(tmp_path / "big.npz", tmp_path / "out.npz", dtype=np.float16)
    assert not (tmp_path / "out.npz").exists()
    export_for_inference(tmp_path / "big.npz", tmp_path / "out.npz")  # float32 holds them
    with pytest.raises(ValueError, match="must be a floating-point type or int8, got int16"):
        export_for_inference(tmp_path / "big.npz", tmp_path / "out.npz", dtype=np.int16)


class InterruptAt:
    """An augmenter wrapper that raises KeyboardInterrupt at a given (epoch, step): a simulated Ctrl-C.

    The Trainer re-seeds the augmenter once at the start of every epoch, so counting
    ``reseed`` calls tells the epoch without repeating the Trainer's seed formula.
    """

    def __init__(self, inner, epoch, step):
        self.inner, self.epoch, self.step = inner, epoch, step
        self.epochs_started, self.calls = 0, 0

    def reseed(self, seed):
        self.inner.reseed(seed)
        self.epochs_started += 1
        self.calls = 0

    def __call__(self, x, training=True):
        self.calls += 1
        if self.epochs_started == self.epoch + 1 and self.calls == self.step:
            raise KeyboardInterrupt
        return self.inner(x, training)


def test_ctrl_c_keeps_the_last_epoch_and_resume_finishes_identically(tmp_path):
    x, y = tiny_data()
    xv, yv = tiny_data(32, seed=1)
    full = make_trainer(tmp_path / "full")
    full.fit(x, y, xv, yv, epochs=3, log=lambda *_: None)

    run = make_trainer(tmp_path / "run")
    run.augmenter = InterruptAt(run.augmenter, epoch=1, step=3)  # epoch index 1: the second epoch
    messages = []
    run.fit(x, y, xv, yv, epochs=3, log=messages.append)
    assert run.interrupted and run.epoch == 1
    assert "interrupted during epoch 2" in messages[-1] and "--resume" in messages[-1]
    assert load_npz(tmp_path / "run" / "last.npz")[1]["epoch"] == 1

    resumed = make_trainer(tmp_path / "run", init_seed=7)
    resumed.fit(x, y, xv, yv, epochs=3, resume=True, log=lambda *_: None)
    assert_same_state(full.model, resumed.model)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    x, y = tiny_data()
    trainer = make_trainer(tmp_path)
    trainer.fit(x, y, epochs=1, log=lambda *_: None)
    good = load_npz(tmp_path / "last.npz")[0]
    x_bad = x.copy()
    x_bad[5] = np.nan
    with pytest.raises(TrainingDiverged, match=r"loss became nan.*last\.npz"):
        trainer.fit(x_bad, y, epochs=2, log=lambda *_: None)
    after = load_npz(tmp_path / "last.npz")[0]
    for k in good:
        np.testing.assert_array_equal(good[k], after[k], err_msg=k)


def test_early_stopping_stops_when_validation_accuracy_stalls(tmp_path):
    x, y = tiny_data()
    trainer = make_trainer(tmp_path, early_stopping=2)
    trainer.optimizer.lr = 0.0  # nothing can improve after the first epoch:
    trainer.model.layers[1].momentum = 0.0  # not even BatchNorm's running statistics
    trainer.schedule = None
    trainer.fit(x, y, *tiny_data(32, 1), epochs=10, log=lambda *_: None)
    assert trainer.stopped_early and trainer.epoch == 3


def test_resume_with_another_seed_is_refused(tmp_path):
    x, y = tiny_data()
    make_trainer(tmp_path).fit(x, y, epochs=1, log=lambda *_: None)
    other = make_trainer(tmp_path)
    other.seed = 4
    with pytest.raises(ValueError, match="seed 3"):
        other.fit(x, y, epochs=2, resume=True, log=lambda *_: None)


def test_stream_offset_draws_the_streams_of_later_epochs(tmp_path):
    """A second phase (stream_offset k) must not replay the shuffles, dropout masks and augmented
    views its weights were trained on: its epoch e draws exactly what epoch k + e of a run with
    offset 0 draws, and something else than that run's epoch e."""
    x, y = tiny_data()

    def streams(trainer, epoch):
        trainer._reseed(epoch)
        order = minicnn.backend.random_state(np).permutation(len(y))
        views = trainer.augmenter(x[:8], training=True)
        return order, views

    plain, later = make_trainer(None), make_trainer(None, stream_offset=3)
    order3, views3 = streams(plain, 3)
    order0, views0 = streams(plain, 0)
    later_order0, later_views0 = streams(later, 0)
    np.testing.assert_array_equal(later_order0, order3)
    np.testing.assert_array_equal(later_views0, views3)
    assert not np.array_equal(later_order0, order0) and not np.allclose(later_views0, views0)
    with pytest.raises(ValueError, match="stream_offset.*>= 0, got -1"):
        make_trainer(None, stream_offset=-1)


def test_stream_offset_is_saved_and_a_resume_with_another_is_refused(tmp_path):
    x, y = tiny_data()
    make_trainer(tmp_path, stream_offset=5).fit(x, y, epochs=1, log=lambda *_: None)
    _, meta = load_npz(tmp_path / "last.npz")
    assert meta["trainer"]["stream_offset"] == 5
    with pytest.raises(ValueError, match="stream_offset 5, this run has stream_offset 0"):
        make_trainer(tmp_path).fit(x, y, epochs=2, resume=True, log=lambda *_: None)


@pytest.mark.slow
def test_short_training_on_real_fer2013_learns_well_above_chance(fer2013_path, tmp_path):
    """A 3-epoch run of the Technical Review Document's small CNN on 4,000 real images."""
    from minicnn.cli import train  # noqa: PLC0415

    code = train.main(["--data", fer2013_path, "--model", "trd_cnn", "--classes", "6", "--limit", "4000",
                       "--epochs", "3", "--no-augment", "--batch-size", "64", "--no-progress",
                       "--out", str(tmp_path), "--seed", "1"])
    assert code == 0
    metrics = json.loads((tmp_path / "test_metrics.json").read_text())
    majority = max(metrics["per_class"][c]["support"] for c in metrics["class_names"]) / metrics["num_examples"]
    assert metrics["num_examples"] == 3589
    assert metrics["accuracy"] > majority + 0.10, (metrics["accuracy"], majority)


# -- precise BN after every epoch (Trainer(precise_bn=N), train.py --precise-bn N) -----------------------------
def test_precise_bn_changes_no_weight_only_the_statistics_validation_sees(tmp_path):
    """Training draws and weights are those of the same run without it; val is scored with the recalibrated stats."""
    x, y = tiny_data()
    xv, yv = tiny_data(32, seed=1)
    plain = make_trainer(tmp_path / "plain")
    plain.fit(x, y, xv, yv, epochs=3, log=lambda *_: None)
    precise = make_trainer(tmp_path / "precise", precise_bn=40)
    lines = []
    precise.fit(x, y, xv, yv, epochs=3, log=lines.append)

    weights = lambda t: {k: v for k, v in t.model.state_arrays().items() if "running" not in k}  # noqa: E731
    for k, v in weights(plain).items():
        np.testing.assert_array_equal(v, weights(precise)[k], err_msg=k)
    for h_plain, h_precise in zip(plain.history, precise.history):
        assert h_plain["train_loss"] == h_precise["train_loss"]
        assert h_precise["precise_bn_images"] == 40 and h_precise["precise_bn_seconds"] >= 0
    # After epoch 1, validation with the moving averages is the plain run's. (Later, the averages continue from the
    # recalibrated statistics: over this tiny epoch's 6 steps they keep 0.9**6 of them, over FER-2013's ~200 none.)
    assert precise.history[0]["val_loss_without_precise_bn"] == plain.history[0]["val_loss"]
    assert precise.history[0]["val_acc_without_precise_bn"] == plain.history[0]["val_acc"]
    assert [h["val_loss"] for h in precise.history] != [h["val_loss"] for h in plain.history]
    assert "precise BN on 40 images" in lines[-1] and "without)" in lines[-1]

    # The statistics are exactly recalibrate_batchnorm's on the 40 images the documented draw picks.
    twin = make_trainer(None)
    twin.model.load_state_arrays(precise.model.state_arrays())
    chosen = np.sort(np.random.default_rng(twin._epoch_seed(2) + 2).choice(len(x), size=40, replace=False))
    minicnn.recalibrate_batchnorm(twin.model, x[chosen], batch_size=16, seed=twin._epoch_seed(2))
    assert_same_state(twin.model, precise.model)
    assert precise.evaluate(xv, yv) == (pytest.approx(precise.history[-1]["val_loss"], abs=1e-6),
                                        precise.history[-1]["val_acc"])

    # The checkpoints hold the recalibrated statistics and record the setting; history.csv has the new columns.
    arrays, meta = load_npz(tmp_path / "precise" / "last.npz")
    bn_mean = next(k for k in arrays if k.endswith("running_mean"))
    np.testing.assert_array_equal(arrays[bn_mean], twin.model.state_arrays()[bn_mean])
    assert meta["trainer"]["precise_bn"] == 40
    header = (tmp_path / "precise" / "history.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == ["val_loss_without_precise_bn", "val_acc_without_precise_bn", "precise_bn_images",
                           "precise_bn_seconds"]


def test_precise_bn_resumes_bit_exactly(tmp_path):
    x, y = tiny_data()
    xv, yv = tiny_data(32, seed=1)
    full = make_trainer(tmp_path / "full", precise_bn=500)  # more than the 96 images: all of them
    full.fit(x, y, xv, yv, epochs=3, log=lambda *_: None)
    assert full.history[0]["precise_bn_images"] == 96
    first = make_trainer(tmp_path / "split", precise_bn=500)
    first.fit(x, y, xv, yv, epochs=1, log=lambda *_: None)
    second = make_trainer(tmp_path / "split", init_seed=7, precise_bn=500)
    second.fit(x, y, xv, yv, epochs=3, resume=True, log=lambda *_: None)
    assert_same_state(full.model, second.model)
    assert full.history == [dict(h, precise_bn_seconds=f["precise_bn_seconds"], seconds=f["seconds"],
                                 img_per_s=f["img_per_s"]) for h, f in zip(second.history, full.history)]


def test_precise_bn_without_validation_still_recalibrates_what_is_saved(tmp_path):
    x, y = tiny_data()
    trainer = make_trainer(tmp_path, precise_bn=32)
    history = trainer.fit(x, y, epochs=1, log=lambda *_: None)
    assert history[0]["val_acc"] is None and history[0]["val_acc_without_precise_bn"] is None
    twin = make_trainer(None)
    twin.model.load_state_arrays(trainer.model.state_arrays())
    chosen = np.sort(np.random.default_rng(twin._epoch_seed(0) + 2).choice(len(x), size=32, replace=False))
    minicnn.recalibrate_batchnorm(twin.model, x[chosen], batch_size=16, seed=twin._epoch_seed(0))
    assert_same_state(twin.model, trainer.model)


@pytest.mark.parametrize("value", [1, -3, 2.5, True, "100"])
def test_precise_bn_refuses_a_bad_count(value):
    with pytest.raises(ValueError, match=r"precise_bn is the number of training images.*0 \(off\) or at least 2"):
        make_trainer(None, precise_bn=value)


def test_precise_bn_refuses_a_network_without_batchnorm():
    model = minicnn.Sequential([minicnn.Flatten(), minicnn.Dense(144, 3)], input_shape=(1, 12, 12), name="plain")
    with pytest.raises(ValueError, match="precise_bn=64 recalibrates BatchNorm statistics, but plain has no BatchNorm"):
        Trainer(model, Adam(model), precise_bn=64)
