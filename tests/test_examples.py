"""examples/fer2013 evaluate.py and predict.py, end to end on a tiny synthetic FER-2013 folder; minicnn.inference.

A module fixture writes 7 classes x (10 Training + 3 PublicTest) PNGs to a
temporary folder and trains hw3_cnn on them for one epoch with train.main, so
the checkpoint has exactly the layout train.py writes. Nothing here reads the
real data except the test of the shipped weights (skipped without them).
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minicnn
from minicnn.classifier import pretrained_path
from minicnn.data import CLASS_NAMES, Augmenter, Normalizer, load_fer2013
from minicnn.inference import predict_proba, predict_tta, tta_views
from minicnn.models import build_model
from minicnn.checkpoint import load_npz, save_npz
from minicnn.training import save_checkpoint

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "fer2013"
N_TRAIN, N_TEST = 10, 3  # per class


def load_script(name):
    """The command behind examples/fer2013/<name>.py: the module minicnn.cli.<name>."""
    return importlib.import_module(f"minicnn.cli.{name}")


train_script, evaluate_script, predict_script, precise_bn_script = (
    load_script(n) for n in ("train", "evaluate", "predict", "precise_bn"))


def assert_png(path, min_bytes=2_000):
    path = Path(path)
    assert path.is_file() and path.stat().st_size >= min_bytes, f"{path} missing or tiny"
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= 100
        im.verify()


def write_fer_folder(root: Path):
    """train/<class>/Training_*.png and test/<class>/PublicTest_*.png; the class sets the mean grey level."""
    rng = np.random.default_rng(0)
    for split, prefix, n in (("train", "Training", N_TRAIN), ("test", "PublicTest", N_TEST)):
        for c, name in enumerate(CLASS_NAMES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = (rng.random((48, 48)) * 60 + 30 * c).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{prefix}_{c}{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def fer_run(tmp_path_factory):
    """(data folder, run folder) after one epoch of hw3_cnn with train.py on the synthetic data."""
    base = tmp_path_factory.mktemp("fer")
    data = write_fer_folder(base / "data")
    run = base / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINICNN_CACHE", str(base / "cache"))  # never write the decoding cache to ~/.cache
        rc = train_script.main(["--data", str(data), "--out", str(run), "--epochs", "1", "--limit", "64",
                                "--batch-size", "16", "--no-progress", "--model", "hw3_cnn"])
        assert rc == 0 and (run / "best.npz").is_file()
        yield data, run


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICNN_CACHE", str(tmp_path / "cache"))


def run_main(script, argv, capsys):
    """(exit code, stdout, stderr) of ``script.main(argv)``."""
    rc = script.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- evaluate.py


def check_report(result, n_images, class_names):
    for key in ("accuracy", "loss", "num_examples", "per_class", "macro_avg", "confusion_matrix",
                "confusion_matrix_normalized", "checkpoint", "split", "tta", "class_names"):
        assert key in result, key
    cm = np.array(result["confusion_matrix"])
    k = len(class_names)
    assert cm.shape == (k, k)
    assert cm.sum() == result["num_examples"] == n_images
    assert result["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert result["class_names"] == list(class_names)
    assert list(result["per_class"]) == list(class_names)
    for i, name in enumerate(class_names):
        stats = result["per_class"][name]
        assert set(stats) == {"precision", "recall", "f1", "support"}
        assert stats["support"] == cm[i].sum()
        if cm[i].sum():
            assert stats["recall"] == pytest.approx(cm[i, i] / cm[i].sum())
    norm = np.array(result["confusion_matrix_normalized"])
    np.testing.assert_allclose(norm[cm.sum(1) > 0].sum(axis=1), 1.0, atol=1e-3)


def test_evaluate_test_split_with_plots(fer_run, tmp_path, capsys, cache_env):
    data, run = fer_run
    plots = tmp_path / "plots"
    rc, out, err = run_main(evaluate_script, ["--checkpoint", str(run / "best.npz"), "--data", str(data),
                                              "--plots", str(plots), "--batch-size", "8"], capsys)
    assert rc == 0, err
    result = json.loads(out)  # stdout is nothing but the JSON document
    check_report(result, 7 * N_TEST, CLASS_NAMES)
    assert result["split"] == "test" and result["tta"] is False
    info = result["checkpoint"]
    assert info["model"] == "hw3_cnn" and info["history_length"] == 1
    assert info["epochs_total"] == info["phase_epoch"] == 1 and info["phases"] == 1 and "epoch" not in info
    assert set(result["plots"]) == {"history", "confusion_matrix", "misclassified", "saliency", "filters",
                                    "activations"}
    assert result["plots_skipped"] == {}
    for path in result["plots"].values():
        assert Path(path).parent == plots
        assert_png(path)
    assert json.loads((plots / "metrics.json").read_text()) == result


def test_evaluate_rebuilds_the_validation_split_of_training(fer_run, capsys, cache_env):
    data, run = fer_run
    ckpt = str(run / "best.npz")
    rc, out, err = run_main(evaluate_script, ["--checkpoint", ckpt, "--data", str(data), "--split", "val"], capsys)
    assert rc == 0, err
    result = json.loads(out)
    check_report(result, 7, CLASS_NAMES)  # round(0.1 * 10) = 1 per class
    # The very images train.py validated on: the same accuracy and loss as its history says
    # (the loss would differ for any other set of images).
    history = json.loads((run / "history.json").read_text())
    assert result["accuracy"] == pytest.approx(history[-1]["val_acc"], abs=1e-6)
    assert result["loss"] == pytest.approx(history[-1]["val_loss"], abs=1e-4)

    rc, out, err = run_main(evaluate_script, ["--checkpoint", ckpt, "--data", str(data), "--split", "train"], capsys)
    assert rc == 0, err
    check_report(json.loads(out), 7 * N_TRAIN - 7, CLASS_NAMES)

    rc, out, err = run_main(evaluate_script, ["--checkpoint", ckpt, "--data", str(data), "--split", "val", "--tta"],
                            capsys)
    assert rc == 0, err
    result = json.loads(out)
    check_report(result, 7, CLASS_NAMES)
    assert result["tta"] is True and result["tta_padding"] == 4 and result["tta_padding_source"] == "default"

    # --tta-padding reaches the crops: other shifts, other averaged probabilities, another loss.
    rc, out, err = run_main(evaluate_script, ["--checkpoint", ckpt, "--data", str(data), "--split", "val", "--tta",
                                              "--tta-padding", "2"], capsys)
    assert rc == 0, err
    shifted = json.loads(out)
    assert shifted["tta_padding"] == 2 and shifted["loss"] != pytest.approx(result["loss"], abs=1e-9)
    assert shifted["tta_padding_source"] == "--tta-padding"
    with pytest.raises(SystemExit):
        evaluate_script.parse_args(["--tta", "--tta-padding", "24"])
    assert "--tta-padding must be between 0 and 23" in capsys.readouterr().err


def test_evaluate_prints_a_per_class_table_and_a_progress_bar_on_stderr(fer_run, capsys, cache_env):
    data, run = fer_run
    argv = ["--checkpoint", str(run / "best.npz"), "--data", str(data), "--batch-size", "8"]
    rc, out, err = run_main(evaluate_script, argv, capsys)
    assert rc == 0, err
    result = json.loads(out)  # stdout stays nothing but the JSON document
    lines = err.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split() == ["precision", "recall", "f1", "support"])
    assert "hw3_cnn, epoch 1: test split (PublicTest)" in lines[head - 1]
    for name, line in zip(CLASS_NAMES, lines[head + 1 : head + 8]):
        r = result["per_class"][name]
        assert line.split() == [name, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}",
                                str(r["support"])]
    acc = next(line for line in lines if line.startswith("accuracy "))
    assert acc.split() == ["accuracy", f"{result['accuracy']:.4f}", str(7 * N_TEST)]
    macro = next(line for line in lines if line.startswith("macro avg"))
    m = result["macro_avg"]
    assert macro.split()[2:] == [f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(7 * N_TEST)]
    assert "predicting: 100%" in err and f"{7 * N_TEST}/{7 * N_TEST}" in err  # the tqdm bar, finished

    rc, out, err = run_main(evaluate_script, argv + ["--tta", "--quiet"], capsys)
    assert rc == 0, err
    assert json.loads(out)["tta"] is True
    assert "precision" not in err and "%|" not in err  # --quiet: neither table nor bar
    rc, out, err = run_main(evaluate_script, argv + ["--tta"], capsys)
    assert "predicting (TTA, 10 views): 100%" in err and "TTA padding 4 (default)" in err


def test_predict_functions_show_progress_only_when_asked(capsys):
    model = small_model()
    x = np.random.default_rng(0).normal(size=(7, 1, 12, 12)).astype(np.float32)
    quiet = predict_tta(model, x, batch_size=3)
    assert capsys.readouterr().err == ""
    np.testing.assert_allclose(predict_tta(model, x, batch_size=3, progress="tta bar"), quiet)
    err = capsys.readouterr().err
    assert "tta bar: 100%" in err and "7/7" in err
    predict_proba(model, x, batch_size=3, progress=True)
    assert "7/7" in capsys.readouterr().err


def test_best_padding_is_the_most_accurate_and_the_smallest_among_ties():
    assert evaluate_script.best_padding({2: 0.6598, 3: 0.6595, 4: 0.6581}) == 2  # the shipped weights' figures
    assert evaluate_script.best_padding({4: 0.70, 2: 0.60, 3: 0.65}) == 4
    assert evaluate_script.best_padding({4: 0.5, 3: 0.6, 1: 0.6}) == 1


def test_choose_tta_padding_on_val_records_it_in_the_checkpoint(fer_run, tmp_path, capsys, cache_env):
    data, run = fer_run
    ckpt = tmp_path / "best.npz"
    ckpt.write_bytes((run / "best.npz").read_bytes())
    arrays_before, meta_before = load_npz(ckpt)
    base = ["--checkpoint", str(ckpt), "--data", str(data), "--split", "val", "--tta"]
    accs = {}
    for pad in (0, 1, 3):
        rc, out, err = run_main(evaluate_script, base + ["--tta-padding", str(pad), "--quiet"], capsys)
        assert rc == 0, err
        accs[pad] = json.loads(out)["accuracy"]
    best = max(accs, key=lambda q: (accs[q], -q))
    rc, out, err = run_main(evaluate_script, base + ["--choose-tta-padding", "3", "1", "0"], capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert result["tta_padding"] == best and result["accuracy"] == pytest.approx(accs[best])
    assert result["tta_padding_source"] == "chosen on val (--choose-tta-padding)"
    for pad in (0, 1, 3):
        assert f"padding {pad}: val accuracy {accs[pad]:.4f}" in err
    arrays_after, meta_after = load_npz(ckpt)
    assert meta_after["tta"] == result["tta_choice"] == result["checkpoint"]["tta"]
    assert meta_after["tta"]["padding"] == best and meta_after["tta"]["chosen_on"] == "val"
    assert meta_after["tta"]["val_accuracy"] == pytest.approx(accs[best])
    assert meta_after["tta"]["candidates"] == {str(q): pytest.approx(a) for q, a in accs.items()}
    # the weights and everything else are untouched, and no temporary file is left behind
    assert set(arrays_after) == set(arrays_before)
    for name in arrays_before:
        np.testing.assert_array_equal(arrays_after[name], arrays_before[name])
    assert {k: v for k, v in meta_after.items() if k != "tta"} == meta_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.npz", "cache"]
    assert minicnn.load(ckpt).tta_padding == best

    # --tta now uses the recorded padding by default, and says so; --tta-padding still overrides it
    rc, out, err = run_main(evaluate_script, ["--checkpoint", str(ckpt), "--data", str(data), "--tta"], capsys)
    result = json.loads(out)
    assert result["tta_padding"] == best and result["tta_padding_source"] == "checkpoint (chosen on val)"
    rc, out, err = run_main(evaluate_script, ["--checkpoint", str(ckpt), "--data", str(data), "--tta",
                                              "--tta-padding", "5"], capsys)
    assert json.loads(out)["tta_padding"] == 5

    # choosing on a test set, or without --tta, is refused before anything runs
    for argv, why in ((["--split", "test", "--tta"], "chooses on the validation split (--split val), not on test"),
                      (["--split", "privatetest", "--tta"], "not on privatetest"),
                      (["--split", "val"], "needs --tta"),
                      (["--split", "val", "--tta", "--tta-padding", "2"], "not both"),
                      (["--split", "val", "--tta", "--choose-tta-padding", "2", "30"], "between 0 and 23")):
        if "--choose-tta-padding" not in argv:
            argv = argv + ["--choose-tta-padding", "2", "3"]
        with pytest.raises(SystemExit) as exit_info:
            evaluate_script.parse_args(["--checkpoint", str(ckpt), *argv])
        assert exit_info.value.code == 2
        assert why in capsys.readouterr().err
    assert load_npz(ckpt)[1] == meta_after


def test_precise_bn_recalibrates_on_the_clean_training_split(fer_run, tmp_path, capsys, cache_env):
    from minicnn.cli.common import load_split, open_checkpoint, to_model_input, training_args  # noqa: PLC0415

    data, run = fer_run
    src = run / "best.npz"
    src_bytes = src.read_bytes()
    out = tmp_path / "pbn.npz"
    rc, stdout, err = run_main(precise_bn_script, ["--checkpoint", str(src), "--out", str(out), "--data", str(data),
                                                   "--batch-size", "16"], capsys)
    assert rc == 0, err
    record = json.loads(stdout)
    assert record["out"] == str(out) and record["source"] == str(src)
    assert (record["images"], record["batches"], record["batchnorm_layers"]) == (63, 3, 6)  # 70 minus 7 for val
    assert src.read_bytes() == src_bytes  # the source is left as it is

    # Expected: the source network recalibrated on train.py's training images (not val, not test),
    # normalised with the checkpoint's statistics, not augmented.
    model, norm, names, meta = open_checkpoint(src)
    old_buffers = {k: v.copy() for k, v in model.state_arrays().items() if k.startswith("buffer/")}
    train_ds = load_split(data, "train", training_args(meta, names), names)
    minicnn.recalibrate_batchnorm(model, to_model_input(norm, train_ds.images), batch_size=16, seed=0)
    new_model, new_norm, new_names, new_meta = open_checkpoint(out)
    got, want = new_model.state_arrays(), model.state_arrays()
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert any(not np.allclose(want[k], old_buffers[k]) for k in old_buffers)
    for k, v in norm.to_arrays().items():
        np.testing.assert_array_equal(new_norm.to_arrays()[k], v)
    assert new_names == names and new_meta["history"] == meta["history"]
    assert new_meta["batchnorm_recalibration"]["val_after"] == record["val_after"]

    # The figures it prints are evaluate.py's on the validation split, before and after.
    for ckpt, key in ((src, "val_before"), (out, "val_after")):
        rc, stdout, err = run_main(evaluate_script, ["--checkpoint", str(ckpt), "--data", str(data), "--split", "val"],
                                   capsys)
        assert rc == 0, err
        result = json.loads(stdout)
        assert result["accuracy"] == pytest.approx(record[key]["accuracy"])
        assert result["loss"] == pytest.approx(record[key]["loss"], abs=1e-5)
    assert result["checkpoint"]["batchnorm_recalibration"]["source"] == str(src)


def test_precise_bn_refuses_to_overwrite_and_names_a_bad_checkpoint(fer_run, tmp_path, capsys, cache_env):
    data, run = fer_run
    with pytest.raises(SystemExit):
        precise_bn_script.parse_args(["--checkpoint", str(run / "best.npz"), "--out", str(run / "best.npz")])
    assert "--out must differ from --checkpoint" in capsys.readouterr().err
    missing = tmp_path / "nope.npz"
    rc, _, err = run_main(precise_bn_script, ["--checkpoint", str(missing), "--out", str(tmp_path / "o.npz"),
                                              "--data", str(data)], capsys)
    assert rc == 2 and str(missing) in err
    assert not (tmp_path / "o.npz").exists()
    # a network without BatchNorm is refused by name before any data is read (none exists at --data here)
    no_bn = pretrained_path("amth667_cnn")
    rc, _, err = run_main(precise_bn_script, ["--checkpoint", str(no_bn), "--out", str(tmp_path / "o.npz"),
                                              "--data", str(tmp_path / "no_data")], capsys)
    assert rc == 2 and f"{no_bn}: its network (amth667_cnn) has no BatchNorm layer" in err, err
    assert "Traceback" not in err and not (tmp_path / "o.npz").exists()


# --------------------------------------------------------------------------- minicnn export


def evaluate_checkpoints(data, capsys, **paths):
    """``{name: evaluate.py's JSON report}`` for each checkpoint ``name=path``, on the test split of ``data``."""
    results = {}
    for name, path in paths.items():
        rc, stdout, _ = run_main(evaluate_script, ["--checkpoint", str(path), "--data", str(data)], capsys)
        assert rc == 0, name
        results[name] = json.loads(stdout)
    return results


def test_export_writes_a_float16_file_that_evaluates_like_its_checkpoint(fer_run, tmp_path, capsys, cache_env):
    export_script = load_script("export")
    data, run = fer_run
    out = tmp_path / "model16.npz"
    rc, stdout, _ = run_main(export_script, [str(run / "best.npz"), str(out), "--dtype", "float16"], capsys)
    report = json.loads(stdout)
    assert rc == 0 and report["model"] == "hw3_cnn" and report["dtype"] == "float16"
    assert report["optimiser_arrays_dropped"] > 0 and 0 < report["rounding_error_vs_array_max"] <= 2.0 ** -11
    assert report["bytes"]["exported"] == out.stat().st_size < report["bytes"]["checkpoint"] / 4  # Adam: 3 copies
    results = evaluate_checkpoints(data, capsys, source=run / "best.npz", float16=out)
    assert results["float16"]["loss"] == pytest.approx(results["source"]["loss"], rel=1e-2)
    assert results["float16"]["num_examples"] == results["source"]["num_examples"] == 7 * N_TEST


def test_export_writes_an_int8_file_that_evaluates_close_to_its_checkpoint(fer_run, tmp_path, capsys, cache_env):
    export_script = load_script("export")
    data, run = fer_run
    out, half = tmp_path / "model8.npz", tmp_path / "model16.npz"
    rc, stdout, _ = run_main(export_script, [str(run / "best.npz"), str(out), "--dtype", "int8"], capsys)
    report = json.loads(stdout)
    assert rc == 0 and report["dtype"] == "int8"
    # within half a step of each output unit's largest weight (1/254); float16's 2**-11 would be finer
    assert 2.0 ** -11 < report["rounding_error_vs_array_max"] <= 1 / 254 * 1.001
    assert run_main(export_script, [str(run / "best.npz"), str(half), "--dtype", "float16"], capsys)[0] == 0
    assert out.stat().st_size < 0.6 * half.stat().st_size  # int8 matrices; biases and BatchNorm stay float32
    results = evaluate_checkpoints(data, capsys, source=run / "best.npz", int8=out)
    assert results["int8"]["loss"] == pytest.approx(results["source"]["loss"], rel=3e-2)
    assert results["int8"]["loss"] != results["source"]["loss"]


def test_export_refuses_its_source_an_existing_file_and_a_non_checkpoint(fer_run, tmp_path, capsys):
    export_script = load_script("export")
    _, run = fer_run
    with pytest.raises(SystemExit):
        export_script.parse_args([str(run / "best.npz"), str(run / "best.npz")])
    assert "out must differ from the checkpoint" in capsys.readouterr().err
    (tmp_path / "taken.npz").write_bytes(b"x")
    with pytest.raises(SystemExit):
        export_script.parse_args([str(run / "best.npz"), str(tmp_path / "taken.npz")])
    assert "taken.npz exists: give --overwrite" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not weights")
    rc, _, err = run_main(export_script, [str(tmp_path / "notes.txt"), str(tmp_path / "o.npz")], capsys)
    assert rc == 2 and "notes.txt" in err and "looks like a text file" in err
    assert not (tmp_path / "o.npz").exists()



# --------------------------------------------------------------------------- minicnn average


@pytest.fixture(scope="module")
def two_phases(fer_run, tmp_path_factory):
    """(data, first, second): fer_run's best.npz and a second phase trained from it (--init-from): two
    checkpoints of one network and split, with different weights, as ``minicnn average`` meets them."""
    data, run = fer_run
    second = tmp_path_factory.mktemp("phase2") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINICNN_CACHE", str(run.parent / "cache"))
        rc = train_script.main(["--data", str(data), "--out", str(second), "--epochs", "1", "--limit", "64",
                                "--batch-size", "16", "--no-progress", "--model", "hw3_cnn", "--lr", "3e-3",
                                "--init-from", str(run / "best.npz"), "--no-test"])
    assert rc == 0
    return data, run / "best.npz", second / "last.npz"


def test_average_writes_the_weighted_mean_that_recalibrates_evaluates_and_trains_on(two_phases, tmp_path, capsys,
                                                                                      cache_env):
    average_script = load_script("average")
    data, first, second = two_phases
    # the first source records a TTA shift and a recalibration: they described its weights, not the average's
    a_arrays, a_meta = load_npz(first)
    tagged = save_npz(tmp_path / "tagged.npz", a_arrays, dict(a_meta, tta={"padding": 2},
                                                              batchnorm_recalibration={"source": "x"}))
    out = tmp_path / "swa.npz"
    rc, stdout, err = run_main(average_script, [str(tagged), str(second), "--weights", "1", "3", "--out", str(out)],
                               capsys)
    assert rc == 0, err
    report = json.loads(stdout)
    assert report["out"] == str(out) and report["model"] == "hw3_cnn"
    assert [(s["path"], s["weight"]) for s in report["sources"]] == [(str(tagged), 1.0), (str(second), 3.0)]

    b_arrays, b_meta = load_npz(second)
    got, meta = load_npz(out)
    weights = [k for k in a_arrays if k.startswith(("param/", "buffer/"))]
    assert weights and set(got) == set(weights) | {k for k in a_arrays if k.startswith("data/")}  # no optim/
    changed = 0
    for k in weights:
        want = (a_arrays[k].astype(np.float64) + 3 * b_arrays[k].astype(np.float64)) / 4
        assert got[k].dtype == a_arrays[k].dtype
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-7, err_msg=k)
        changed += not np.array_equal(a_arrays[k], b_arrays[k])
    assert changed > len(weights) // 2  # the two phases really differ
    for k in ("data/norm/mean", "data/norm/scale", "data/norm/mode"):
        np.testing.assert_array_equal(got[k], a_arrays[k])
    assert meta["optimizer"] is None and meta["schedule"] is None
    assert "tta" not in meta and "batchnorm_recalibration" not in meta
    assert meta["weight_average"]["sources"] == report["sources"]
    assert meta["args"] == a_meta["args"] and meta["data_fingerprint"] == a_meta["data_fingerprint"]

    # precise BN, evaluation (it takes the default TTA shift again) and a new phase all take it
    pbn = tmp_path / "swa_pbn.npz"
    rc, stdout, err = run_main(precise_bn_script, ["--checkpoint", str(out), "--out", str(pbn), "--data", str(data),
                                                   "--batch-size", "16"], capsys)
    assert rc == 0, err
    recalibration = json.loads(stdout)
    assert recalibration["source"] == str(out)
    rc, stdout, err = run_main(evaluate_script, ["--checkpoint", str(pbn), "--data", str(data), "--split", "val"],
                               capsys)
    assert rc == 0, err
    assert json.loads(stdout)["accuracy"] == pytest.approx(recalibration["val_after"]["accuracy"])
    rc, stdout, err = run_main(evaluate_script, ["--checkpoint", str(pbn), "--data", str(data), "--split", "val",
                                                 "--tta"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["tta_padding_source"] == "default"  # not the first source's recorded shift
    rc = train_script.main(["--data", str(data), "--out", str(tmp_path / "phase3"), "--epochs", "1", "--limit", "64",
                            "--batch-size", "16", "--no-progress", "--model", "hw3_cnn", "--init-from", str(out),
                            "--no-test"])
    assert rc == 0


def test_average_of_a_checkpoint_with_itself_or_its_int8_export(two_phases, tmp_path, capsys):
    average_script = load_script("average")
    _, first, _ = two_phases
    out = tmp_path / "self.npz"
    assert run_main(average_script, [str(first), str(first), "--out", str(out)], capsys)[0] == 0
    src, got = load_npz(first)[0], load_npz(out)[0]
    for k, v in got.items():
        np.testing.assert_array_equal(v, src[k], err_msg=k)  # (w + w) / 2 == w, to the bit
    int8 = tmp_path / "int8.npz"
    assert run_main(load_script("export"), [str(first), str(int8), "--dtype", "int8"], capsys)[0] == 0
    assert run_main(average_script, [str(first), str(int8), "--out", str(out), "--overwrite"], capsys)[0] == 0
    from minicnn.checkpoint import dequantize_int8  # noqa: PLC0415

    dequantised, got = dequantize_int8(load_npz(int8)[0]), load_npz(out)[0]
    kernel = "param/0.W"
    assert load_npz(int8)[0][kernel].dtype == np.int8
    np.testing.assert_allclose(got[kernel], (src[kernel] + dequantised[kernel]) / 2, rtol=1e-6, atol=1e-8)
    assert not np.array_equal(got[kernel], src[kernel])


def _changed_copy(path, tmp_path, name, arrays=None, **meta_changes):
    """A copy of checkpoint ``path`` with some arrays and meta entries replaced."""
    src, meta = load_npz(path)
    return save_npz(tmp_path / name, {**src, **(arrays or {})}, {**meta, **meta_changes})


@pytest.mark.parametrize("change, why", [
    ("model", "network {'name': 'hw3_dnn'"),
    ("classes", "classes ['a'"),
    ("fingerprint", "train/validation split"),
    ("normalisation", "data/norm/mean"),
    ("split_args", "--val-fraction 0.2 here, 0.1 there"),
    ("shape", "param/0.W of shape"),
    ("nan", "NaN or infinite"),
    ("text", "looks like a text file"),
])
def test_average_refuses_checkpoints_that_differ_naming_the_file_and_the_difference(two_phases, tmp_path, capsys,
                                                                                     change, why):
    average_script = load_script("average")
    _, first, second = two_phases
    src, meta = load_npz(second)
    if change == "model":
        other = _changed_copy(second, tmp_path, "other.npz", model={"name": "hw3_dnn", "config": {}})
    elif change == "classes":
        other = _changed_copy(second, tmp_path, "other.npz", class_names=["a", "b", "c", "d", "e", "f", "g"])
    elif change == "fingerprint":
        fp = json.loads(json.dumps(meta["data_fingerprint"]))
        fp["val"]["sha256"] = "0" * 64
        other = _changed_copy(second, tmp_path, "other.npz", data_fingerprint=fp)
    elif change == "normalisation":
        other = _changed_copy(second, tmp_path, "other.npz", arrays={"data/norm/mean": src["data/norm/mean"] + 1})
    elif change == "split_args":
        other = _changed_copy(second, tmp_path, "other.npz", args={**meta["args"], "val_fraction": 0.2})
    elif change == "shape":
        other = _changed_copy(second, tmp_path, "other.npz", arrays={"param/0.W": src["param/0.W"][:1]})
    elif change == "nan":
        bad = src["param/0.W"].copy()
        bad.flat[0] = np.nan
        other = _changed_copy(second, tmp_path, "other.npz", arrays={"param/0.W": bad})
    else:
        other = tmp_path / "other.npz"
        other.write_text("not weights")
    out = tmp_path / "swa.npz"
    rc, stdout, err = run_main(average_script, [str(first), str(other), "--out", str(out)], capsys)
    assert rc == 2 and stdout == "" and err.startswith("error:")
    assert str(other) in err and why in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv, why", [
    (["A"], "at least two checkpoints"),
    (["A", "B", "--weights", "1"], "--weights gives 1 weights for 2 checkpoints"),
    (["A", "B", "--weights", "1", "-1"], "--weights must be positive"),
    (["A", "B", "--weights", "1", "nan"], "--weights must be positive"),
    (["A", "B", "--out", "A"], "is one of the checkpoints"),
    (["A", "B", "--out", "TAKEN"], "exists: give --overwrite"),
])
def test_average_refuses_bad_arguments(tmp_path, capsys, argv, why):
    average_script = load_script("average")
    (tmp_path / "TAKEN").write_bytes(b"x")
    argv = [str(tmp_path / a) if a in ("A", "B", "TAKEN") else a for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o.npz")]
    with pytest.raises(SystemExit) as exit_info:
        average_script.parse_args(argv)
    assert exit_info.value.code == 2 and why in capsys.readouterr().err

def test_evaluate_merges_disgust_for_a_six_class_checkpoint(fer_run, tmp_path, capsys, cache_env):
    data, _ = fer_run
    names = [c for c in CLASS_NAMES if c != "disgust"]
    model = build_model("trd_cnn", num_classes=6)
    norm = Normalizer("per_pixel").fit(np.random.default_rng(0).integers(0, 256, (8, 48, 48), dtype=np.uint8))
    ckpt = save_checkpoint(tmp_path / "six.npz", model, epoch=3, history=[],
                           extra_meta={"class_names": names, "args": {"classes": 6, "val_fraction": 0.1, "seed": 0}},
                           extra_arrays=norm.to_arrays(prefix="data/norm/"))
    rc, out, err = run_main(evaluate_script, ["--checkpoint", str(ckpt), "--data", str(data)], capsys)
    assert rc == 0, err
    result = json.loads(out)
    check_report(result, 7 * N_TEST, names)
    assert result["per_class"]["angry"]["support"] == 2 * N_TEST  # angry + disgust
    assert result["checkpoint"]["phase_epoch"] == 3 and result["checkpoint"]["history_length"] == 0
    assert "plots" not in result  # only with --plots


@pytest.mark.parametrize("kind", ["missing", "not_a_checkpoint"])
def test_evaluate_bad_checkpoint_exits_2_naming_the_file(fer_run, tmp_path, capsys, kind):
    data, _ = fer_run
    ckpt = tmp_path / "model.npz"
    if kind == "not_a_checkpoint":
        ckpt.write_text("hello")
    rc, out, err = run_main(evaluate_script, ["--checkpoint", str(ckpt), "--data", str(data)], capsys)
    assert rc == 2 and out == ""
    assert str(ckpt) in err and err.startswith("error:")


# --------------------------------------------------------------------------- predict.py


@pytest.fixture
def face_files(tmp_path):
    rng = np.random.default_rng(3)
    colour = tmp_path / "colour face.jpg"  # a space in the name, and a size that needs resizing
    Image.fromarray(rng.integers(0, 256, (80, 64, 3), dtype=np.uint8), "RGB").save(colour, quality=90)
    gray = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8), "L").save(gray)
    return colour, gray


def test_predict_json_any_size_and_colour(fer_run, face_files, capsys):
    _, run = fer_run
    colour, gray = face_files
    rc, out, err = run_main(predict_script, [str(colour), str(gray), "--checkpoint", str(run / "best.npz"),
                                             "--json", "--top", "3"], capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert result["class_names"] == list(CLASS_NAMES)
    assert [p["image"] for p in result["predictions"]] == [str(colour), str(gray)]
    for pred in result["predictions"]:
        probs = pred["probabilities"]
        assert list(probs) == list(CLASS_NAMES)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert pred["predicted"] == max(probs, key=probs.get)
        assert pred["probability"] == pytest.approx(max(probs.values()))
        assert len(pred["top"]) == 3 and pred["top"][0]["class"] == pred["predicted"]
        top_p = [t["probability"] for t in pred["top"]]
        assert top_p == sorted(top_p, reverse=True)


def test_predict_table_and_agreement_with_the_loader(fer_run, capsys, cache_env):
    data, run = fer_run
    ckpt = str(run / "best.npz")
    image = sorted((data / "test" / "happy").iterdir())[0]
    rc, out, err = run_main(predict_script, [str(image), "--checkpoint", ckpt], capsys)
    assert rc == 0, err
    header, row = out.strip().splitlines()
    assert header.split()[:2] == ["image", "predicted"] and header.split()[2:] == list(CLASS_NAMES)
    assert row.startswith(str(image))
    table_probs = np.array([float(v) for v in row.split()[2:]])
    # Same probabilities as the model on the image decoded by the FER-2013 loader.
    model, norm, _, _ = evaluate_script.open_checkpoint(ckpt)
    ds = load_fer2013(data / "test")
    k = [i for i, lab in enumerate(ds.labels) if CLASS_NAMES[lab] == "happy"][0]
    expected = predict_proba(model, evaluate_script.to_model_input(norm, ds.images[k : k + 1]))[0]
    np.testing.assert_allclose(table_probs, expected, atol=6e-4)  # the table shows 3 decimals
    assert row.split()[1] == CLASS_NAMES[int(expected.argmax())]

    rc, out, err = run_main(predict_script, [str(image), "--checkpoint", ckpt, "--top", "2"], capsys)
    assert rc == 0, err
    header, row = out.strip().splitlines()
    assert header.split() == ["image", "predicted", "top", "1", "top", "2"]


def test_predict_bad_inputs_are_reported_and_skipped(fer_run, face_files, tmp_path, capsys):
    _, run = fer_run
    ckpt = str(run / "best.npz")
    colour, gray = face_files
    missing = tmp_path / "nope.png"
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(gray.read_bytes()[:70])
    # an unreadable file is skipped (named on stderr), the others still predicted: exit 1
    rc, out, err = run_main(predict_script, [str(colour), str(text), str(truncated), str(gray), "--checkpoint", ckpt,
                                             "--json"], capsys)
    assert rc == 1, err
    doc = json.loads(out)
    assert [p["image"] for p in doc["predictions"]] == [str(colour), str(gray)]
    assert [s["image"] for s in doc["skipped"]] == [str(text), str(truncated)]
    assert f"skipped: {text}: not an image" in err and f"skipped: {truncated}: cannot read image" in err
    assert str(colour) not in err
    # a named file that does not exist: exit 2, every problem reported, the rest still predicted
    rc, out, err = run_main(predict_script, [str(colour), str(missing), str(text), "--checkpoint", ckpt], capsys)
    assert rc == 2
    assert f"{missing}: no such file" in err  # every bad file is reported, not only the first
    assert f"{text}: not an image" in err
    assert out.splitlines()[1].startswith(str(colour)) and len(out.splitlines()) == 2
    # nothing readable: exit 2, nothing on stdout; with --json a document that says why
    rc, out, err = run_main(predict_script, [str(text), "--checkpoint", ckpt], capsys)
    assert rc == 2 and out == "" and "no image could be read" in err
    rc, out, err = run_main(predict_script, [str(text), str(missing), "--checkpoint", ckpt, "--json"], capsys)
    doc = json.loads(out)
    assert rc == 2 and doc["predictions"] == [] and "no image could be read" in err
    assert [s["image"] for s in doc["skipped"]] == [str(text), str(missing)]

    rc, out, err = run_main(predict_script, [str(colour), "--checkpoint", str(tmp_path / "gone.npz")], capsys)
    assert rc == 2 and str(tmp_path / "gone.npz") in err


def test_predict_takes_folders_and_a_backend(fer_run, face_files, tmp_path, capsys):
    _, run = fer_run
    ckpt = str(run / "best.npz")
    colour, gray = face_files  # both in tmp_path
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((48, 48), 90, np.uint8)).save(tmp_path / "sub" / "a.bmp")
    Image.fromarray(np.full((48, 48), 90, np.uint8)).save(tmp_path / ".hidden.png")
    (tmp_path / "sub" / "readme.txt").write_text("not an image, and not an image extension: not even tried")
    rc, out, err = run_main(predict_script, [str(tmp_path), "--checkpoint", ckpt, "--json", "--backend", "numpy"],
                            capsys)
    assert rc == 0, err
    doc = json.loads(out)
    images = [p["image"] for p in doc["predictions"]]
    assert images == [str(colour), str(gray), str(tmp_path / "sub" / "a.bmp")]  # sorted, recursive, no hidden
    assert doc["skipped"] == [] and err == ""
    # the same probabilities as the files named one by one
    rc, out, err = run_main(predict_script, [str(gray), "--checkpoint", ckpt, "--json"], capsys)
    alone = json.loads(out)["predictions"][0]["probabilities"]
    assert alone == pytest.approx(doc["predictions"][1]["probabilities"], rel=1e-4, abs=1e-6)  # float32, other batch
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = run_main(predict_script, [str(empty), "--checkpoint", ckpt], capsys)
    assert rc == 2 and f"{empty}: a folder with no image files" in err
    with pytest.raises(SystemExit):
        predict_script.parse_args([str(gray), "--backend", "torch"])


def test_predict_defaults_to_the_shipped_weights(face_files, capsys):
    colour, _ = face_files
    rc, out, err = run_main(predict_script, [str(colour), "--json"], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["checkpoint"] == str(pretrained_path("hw3_cnn"))
    expected = minicnn.pretrained("hw3_cnn").predict_proba([colour])[0]
    np.testing.assert_allclose(list(doc["predictions"][0]["probabilities"].values()), expected, rtol=1e-6)


def test_predict_cli_has_no_traceback(tmp_path, face_files):
    colour, _ = face_files
    ckpt = tmp_path / "missing.npz"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "predict.py"), str(colour), "--checkpoint", str(ckpt)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert str(ckpt) in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- minicnn.inference


def small_model():
    return minicnn.Sequential([minicnn.Conv2D(1, 2, 3, padding=1), minicnn.ReLU(), minicnn.Flatten(),
                               minicnn.Dense(2 * 12 * 12, 4)], input_shape=(1, 12, 12))


def test_predict_proba_rows_sum_to_one_in_any_batching():
    model = small_model()
    x = np.random.default_rng(0).normal(size=(7, 1, 12, 12)).astype(np.float32)
    p = predict_proba(model, x, batch_size=3)
    assert p.shape == (7, 4) and isinstance(p, np.ndarray)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p, predict_proba(model, x, batch_size=100), rtol=1e-5)


def test_tta_views_and_average(float64):
    model = small_model()
    x = np.random.default_rng(1).normal(size=(5, 1, 12, 12))
    views = tta_views(x, padding=4)
    assert len(views) == 10 and all(v.shape == x.shape for v in views)
    np.testing.assert_array_equal(views[0], x)  # the centre crop is the image itself
    np.testing.assert_array_equal(views[5], x[..., ::-1])  # ... and of the flip, the flip
    # Top-left corner crop: shifted down-right by 4, edge-replicated rows/columns at the top-left.
    np.testing.assert_array_equal(views[1][..., 4:, 4:], x[..., :8, :8])
    np.testing.assert_array_equal(views[1][..., :4, 4:], np.repeat(x[..., :1, :8], 4, axis=-2))
    assert len(tta_views(x, flip=False)) == 5

    # Reference: an independent loop over the 10 crops with np.pad.
    padded = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)), mode="edge")
    padded_flip = np.pad(x[..., ::-1], ((0, 0), (0, 0), (4, 4), (4, 4)), mode="edge")
    expected = np.zeros((5, 4))
    for base in (padded, padded_flip):
        for dy, dx in ((4, 4), (0, 0), (0, 8), (8, 0), (8, 8)):
            expected += predict_proba(model, np.ascontiguousarray(base[..., dy : dy + 12, dx : dx + 12]))
    np.testing.assert_allclose(predict_tta(model, x, batch_size=2), expected / 10, rtol=1e-10)
    np.testing.assert_allclose(predict_tta(model, x).sum(axis=1), 1.0)

    # A constant image looks the same in every view: TTA changes nothing.
    const = np.full((2, 1, 12, 12), 0.7)
    np.testing.assert_allclose(predict_tta(model, const), predict_proba(model, const), rtol=1e-10)


# --------------------------------------------------------------------------- the shipped weights


@pytest.mark.slow
def test_shipped_weights_beat_half_on_publictest(fer2013_path, capsys):
    rc, out, err = run_main(evaluate_script, ["--data", fer2013_path], capsys)  # default: the shipped weights
    assert rc == 0, err
    result = json.loads(out)
    check_report(result, 3589, CLASS_NAMES)
    assert result["checkpoint"]["model"] == "hw3_cnn"
    assert result["accuracy"] > 0.5, f"shipped hw3_cnn reaches only {result['accuracy']:.4f} on PublicTest"


def test_train_augmentation_presets_and_overrides():
    from minicnn.cli import train  # noqa: PLC0415

    hw3 = train.augmentation_settings(train.parse_args([]))
    assert hw3 == {"flip": True, "rotation": 30.0, "shift": 0.1, "zoom": (0.8, 1.2), "crop_padding": 0,
                   "erase_prob": 0.0}
    crop = train.augmentation_settings(train.parse_args(["--augment", "crop", "--rotation", "0", "--zoom", "0.9", "1.1"]))
    assert crop == {"flip": True, "rotation": 0.0, "shift": 0.0, "zoom": (0.9, 1.1), "crop_padding": 4,
                    "erase_prob": 0.0}
    vgg = train.augmentation_settings(train.parse_args(["--augment", "khaireddin", "--erase-prob", "0.25"]))
    assert vgg == {"flip": True, "rotation": 10.0, "shift": 0.2, "zoom": (0.8, 1.2), "crop_padding": 0,
                   "erase_prob": 0.25}
    assert train.augmentation_settings(train.parse_args(["--augment", "khaireddin"]))["erase_prob"] == 0.5
    # every preset is a valid Augmenter, and --erase-prob alone switches augmentation on
    for name in train.AUGMENT_PRESETS:
        Augmenter(**train.augmentation_settings(train.parse_args(["--augment", name])))
    assert Augmenter(**train.augmentation_settings(train.parse_args(["--no-augment", "--erase-prob", "1"]))).active
    with pytest.raises(SystemExit):
        train.parse_args(["--erase-prob", "1.5"])
    off = train.augmentation_settings(train.parse_args(["--no-augment"]))
    assert not any(v for k, v in off.items() if k != "zoom") and off["zoom"] == (1.0, 1.0)


# --------------------------------------------------------------------------- train.py --init-from


def fine_tune_argv(data, init, out, *extra):
    return ["--data", str(data), "--init-from", str(init), "--out", str(out), "--limit", "64", "--batch-size", "16",
            "--no-progress", "--no-test", *extra]


def test_init_from_starts_a_new_run_from_the_checkpoint_weights(fer_run, tmp_path, capsys, cache_env, monkeypatch):
    data, run = fer_run
    out = tmp_path / "phase2"
    # A copy of the checkpoint with other normalisation statistics than this run's data would give: the new
    # run must take the checkpoint's, on which its weights were trained.
    arrays, meta = load_npz(run / "best.npz")
    arrays = {k: (v * 1.5 + 1 if k.startswith("data/norm/") and v.dtype.kind == "f" else v) for k, v in arrays.items()}
    save_npz(tmp_path / "init.npz", arrays, meta)
    # Interrupted in its first epoch: nothing is trained, so last.npz holds exactly the state the new run starts from.
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as mp:
        mp.setattr(minicnn.training.Trainer, "_epoch", interrupt)
        rc = train_script.main(fine_tune_argv(data, tmp_path / "init.npz", out, "--epochs", "1", "--lr", "1e-4"))
    assert rc == 130
    capsys.readouterr()
    start, start_arrays, start_meta = minicnn.training.load_checkpoint(out / "last.npz")
    init, init_arrays, init_meta = minicnn.training.load_checkpoint(tmp_path / "init.npz")
    for name, value in init.state_arrays().items():
        np.testing.assert_array_equal(start.state_arrays()[name], value, err_msg=name)
    norm_keys = sorted(k for k in init_arrays if k.startswith("data/norm/"))
    assert norm_keys and norm_keys == sorted(k for k in start_arrays if k.startswith("data/norm/"))
    for name in norm_keys:
        np.testing.assert_array_equal(start_arrays[name], init_arrays[name], err_msg=name)
    assert start_meta["epoch"] == 0 and start_meta["history"] == []  # a fresh epoch count and history
    assert float(start_arrays["optim/lr"]) == pytest.approx(1e-4) and int(start_arrays["optim/step"]) == 0
    assert start_meta["init"]["checkpoint"] == str(tmp_path / "init.npz")
    assert start_meta["init"]["epoch"] == init_meta["epoch"] == 1
    assert [h["epoch"] for h in start_meta["init"]["epochs_before"]] == [1]

    # One epoch of the second phase trains and counts from 1 again (--overwrite: out holds the interrupted run).
    rc = train_script.main(fine_tune_argv(data, run / "best.npz", out, "--epochs", "1", "--overwrite"))
    assert rc == 0
    after, _, after_meta = minicnn.training.load_checkpoint(out / "last.npz")
    assert after_meta["epoch"] == 1 and [h["epoch"] for h in after_meta["history"]] == [1]
    changed = [k for k, v in init.state_arrays().items() if not np.array_equal(after.state_arrays()[k], v)]
    assert changed, "a trained epoch left every weight as it was"

    # evaluate.py counts both phases and names the starting point.
    capsys.readouterr()
    rc, out_text, err = run_main(evaluate_script, ["--checkpoint", str(out / "last.npz"), "--data", str(data)], capsys)
    assert rc == 0, err
    info = json.loads(out_text)["checkpoint"]
    assert info["phase_epoch"] == 1 and info["epochs_total"] == 2 and info["phases"] == 2
    assert info["init_from"] == str(run / "best.npz") and "epoch" not in info
    assert "2 epochs in all (2 phases; epoch 1 of the last phase)" in err  # the terminal says it too


def test_init_from_draws_fresh_streams_and_a_resumed_phase_ends_identically(fer_run, tmp_path, capsys, cache_env):
    """A phase started from a 1-epoch checkpoint draws the random streams of epochs 2, 3, ... (not those
    its weights were trained on), and interrupted after one epoch and resumed, it ends with the weights
    of an uninterrupted phase and keeps its provenance."""
    data, run = fer_run
    # Normalisation statistics other than a refit would give: the resumed run must keep using them.
    arrays, meta = load_npz(run / "best.npz")
    arrays = {k: (v * 1.5 + 1 if k.startswith("data/norm/") and v.dtype.kind == "f" else v) for k, v in arrays.items()}
    init = save_npz(tmp_path / "init.npz", arrays, meta)
    full, split = tmp_path / "full", tmp_path / "split"
    assert train_script.main(fine_tune_argv(data, init, full, "--epochs", "2", "--schedule", "none")) == 0
    assert train_script.main(fine_tune_argv(data, init, split, "--epochs", "1", "--schedule", "none")) == 0
    # The resumed phase needs neither its arguments again nor the file it was initialised from.
    init.rename(tmp_path / "moved.npz")
    assert train_script.main(["--out", str(split), "--resume", "--epochs", "2", "--no-progress", "--no-test"]) == 0
    capsys.readouterr()
    a, _, meta_a = minicnn.training.load_checkpoint(full / "last.npz")
    b, arrays_b, meta_b = minicnn.training.load_checkpoint(split / "last.npz")
    assert meta_a["trainer"]["stream_offset"] == meta_b["trainer"]["stream_offset"] == 1
    assert meta_b["init"] == meta_a["init"] and meta_b["init"]["checkpoint"] == str(init)
    for k in (k for k in arrays if k.startswith("data/norm/")):
        np.testing.assert_array_equal(arrays_b[k], arrays[k], err_msg=k)
    assert meta_b["epoch"] == 2
    for name, value in a.state_arrays().items():
        np.testing.assert_array_equal(b.state_arrays()[name], value, err_msg=name)


def test_conv_algorithm_changes_memory_not_results_and_a_resumed_run_may_change_it(fer_run, tmp_path, capsys,
                                                                                    cache_env):
    """One epoch with every stride-1 convolution by row shifts ends with the weights of one by im2col (float32
    rounding apart); a run may be resumed with the other algorithm, as with another backend."""
    data, _ = fer_run
    common = ["--data", str(data), "--limit", "64", "--batch-size", "16", "--no-progress", "--no-test",
              "--model", "hw3_cnn", "--schedule", "none", "--optimizer", "sgd", "--lr", "0.01"]
    assert train_script.main([*common, "--out", str(tmp_path / "a"), "--epochs", "1", "--conv-algorithm", "im2col"]) == 0
    assert train_script.main([*common, "--out", str(tmp_path / "b"), "--epochs", "1", "--conv-algorithm", "shifted"]) == 0
    assert "stride-1 convolutions by shifted" in capsys.readouterr().out
    a, _, meta_a = minicnn.training.load_checkpoint(tmp_path / "a" / "last.npz")
    b, _, meta_b = minicnn.training.load_checkpoint(tmp_path / "b" / "last.npz")
    assert meta_b["args"]["conv_algorithm"] == "shifted"
    # SGD, not Adam: a conv bias before BatchNorm has a zero gradient up to rounding, which Adam would scale up
    # to full steps (different in each run, whichever the algorithm); SGD leaves it at rounding size.
    (ha,), (hb,) = meta_a["history"], meta_b["history"]
    assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-5)
    assert hb["val_loss"] == pytest.approx(ha["val_loss"], rel=1e-5)
    for name, value in a.state_arrays().items():
        np.testing.assert_allclose(b.state_arrays()[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    assert train_script.main(["--out", str(tmp_path / "b"), "--resume", "--epochs", "2", "--no-progress", "--no-test",
                              "--conv-algorithm", "im2col"]) == 0
    assert "stride-1 convolutions by im2col" in capsys.readouterr().out
    assert minicnn.training.load_checkpoint(tmp_path / "b" / "last.npz")[2]["epoch"] == 2


def test_precise_bn_flag_recalibrates_after_each_epoch_is_kept_on_resume_and_refused_where_meaningless(
        fer_run, tmp_path, capsys, cache_env):
    data, _ = fer_run
    common = ["--data", str(data), "--limit", "64", "--batch-size", "16", "--no-progress", "--no-test",
              "--model", "hw3_cnn"]
    out = tmp_path / "pbn"
    rc, stdout, err = run_main(train_script, [*common, "--out", str(out), "--epochs", "1", "--precise-bn", "32"], capsys)
    assert rc == 0, err
    assert "precise BN after each epoch on 32 clean Training images" in stdout
    assert "(precise BN on 32 images" in stdout and "without)" in stdout
    (row,) = json.loads((out / "history.json").read_text())
    assert row["precise_bn_images"] == 32 and 0 <= row["val_acc_without_precise_bn"] <= 1
    _, _, meta = minicnn.training.load_checkpoint(out / "last.npz")
    assert meta["args"]["precise_bn"] == 32 and meta["trainer"]["precise_bn"] == 32
    # A resumed run keeps it, and refuses another value (it decides which epoch is the best).
    rc, _, err = run_main(train_script, ["--out", str(out), "--resume", "--precise-bn", "0"], capsys)
    assert rc == 2 and "--precise-bn 0 here, 32 in the run" in err, err
    rc, stdout, err = run_main(train_script, ["--out", str(out), "--resume", "--epochs", "2", "--no-progress"], capsys)
    assert rc == 0 and "(precise BN on 32 images" in stdout, err
    assert [h["precise_bn_images"] for h in json.loads((out / "history.json").read_text())] == [32, 32]
    # A network without BatchNorm has nothing to recalibrate; one image has no statistics.
    rc, _, err = run_main(train_script, [*common, "--out", str(tmp_path / "amth"), "--model", "amth667_cnn",
                                         "--precise-bn", "32"], capsys)
    assert rc == 2 and "--precise-bn 32: amth667_cnn has no BatchNorm layer" in err, err
    assert not (tmp_path / "amth" / "last.npz").exists()
    with pytest.raises(SystemExit) as exc:
        train_script.main([*common, "--out", str(tmp_path / "one"), "--precise-bn", "1"])
    assert exc.value.code == 2 and "--precise-bn: BatchNorm statistics need at least 2 images" in capsys.readouterr().err


def test_full_history_numbers_the_epochs_of_chained_phases():
    from minicnn.cli.common import full_history  # noqa: PLC0415

    first = {"history": [{"epoch": e, "val_acc": 0.1 * e} for e in (1, 2, 3)]}
    assert [(h["epoch"], h["phase"], h["phase_epoch"]) for h in full_history(first)] == [(1, 0, 1), (2, 0, 2), (3, 0, 3)]
    second = {"history": [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.6}],
              "init": {"epochs_before": full_history(first)}}
    rows = full_history(second)
    assert [(h["epoch"], h["phase"], h["phase_epoch"]) for h in rows] == [
        (1, 0, 1), (2, 0, 2), (3, 0, 3), (4, 1, 1), (5, 1, 2)]
    assert [h["val_acc"] for h in rows] == pytest.approx([0.1, 0.2, 0.3, 0.5, 0.6])
    third = {"history": [{"epoch": 1}], "init": {"epochs_before": rows}}
    assert [(h["epoch"], h["phase"]) for h in full_history(third)][-2:] == [(5, 1), (6, 2)]
    # Histories written before phases existed (no "phase" key) count as the first phase.
    legacy = {"history": [{"epoch": 1}], "init": {"epochs_before": [{"epoch": 1}, {"epoch": 2}]}}
    assert [(h["epoch"], h["phase"]) for h in full_history(legacy)] == [(1, 0), (2, 0), (3, 1)]


@pytest.mark.parametrize("extra, message", [
    (["--model", "hw3_dnn"], "holds a 'hw3_cnn' network"),
    (["--seed", "1"], "--seed 0 there, 1 here"),
    (["--val-fraction", "0.2"], "--val-fraction"),
    (["--classes", "6"], "classes"),
])
def test_init_from_refuses_what_does_not_fit(fer_run, tmp_path, cache_env, capsys, extra, message):
    data, run = fer_run
    rc, _, err = run_main(train_script, fine_tune_argv(data, run / "best.npz", tmp_path / "out", "--epochs", "1",
                                                       *extra), capsys)
    assert rc == 2 and err.startswith("error: --init-from") and message in err
    assert not (tmp_path / "out" / "last.npz").exists()


def test_init_from_and_resume_together_is_a_flag_error(fer_run, tmp_path, capsys):
    data, run = fer_run
    with pytest.raises(SystemExit) as exc:
        train_script.main(fine_tune_argv(data, run / "best.npz", tmp_path / "out", "--resume"))
    assert exc.value.code == 2 and "give one of them" in capsys.readouterr().err


def test_init_from_a_missing_or_foreign_file_names_it(fer_run, tmp_path, cache_env, capsys):
    data, _ = fer_run
    for path in (tmp_path / "nope.npz", tmp_path / "plain.npz"):
        if path.name == "plain.npz":
            np.savez(path, x=np.zeros(3))
        rc, _, err = run_main(train_script, fine_tune_argv(data, path, tmp_path / "out", "--epochs", "1"), capsys)
        assert rc == 2 and str(path) in err and err.startswith("error:")


# --------------------------------------------------------------------------- train.py robustness (issue 10)


def train_argv(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--epochs", "1", "--limit", "64", "--batch-size", "16",
            "--no-progress", "--no-test", *extra]


def test_train_refuses_a_non_empty_run_folder_unless_overwrite(fer_run, tmp_path, capsys, cache_env):
    data, run = fer_run
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    rc, _, err = run_main(train_script, train_argv(data, run), capsys)
    assert rc == 2 and err.startswith(f"error: --out {run}: the folder is not empty")
    assert "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # the previous run is untouched

    copy = tmp_path / "run"
    copy.mkdir()
    for name, content in before.items():
        (copy / name).write_bytes(content)
    (copy / "best.npz").write_bytes(b"a stale best epoch of the previous run")
    # A run refused for another reason (here its data) leaves the previous run as it was.
    rc, _, err = run_main(train_script, train_argv(tmp_path / "nowhere", copy, "--overwrite"), capsys)
    assert rc == 2 and sorted(p.name for p in copy.iterdir()) == sorted(before)
    rc, _, err = run_main(train_script, train_argv(data, copy, "--overwrite", "--seed", "3"), capsys)
    assert rc == 0, err
    assert minicnn.training.load_checkpoint(copy / "best.npz")[2]["args"]["seed"] == 3  # the new run's
    assert not (copy / "test_metrics.json").exists()  # the old run's metrics are gone (--no-test here)


def test_resume_needs_only_out_and_refuses_other_arguments(fer_run, tmp_path, capsys, cache_env):
    data, _ = fer_run
    out = tmp_path / "run"
    assert run_main(train_script, train_argv(data, out, "--lr", "0.002", "--augment", "none"), capsys)[0] == 0
    for extra, message in [(["--lr", "0.01"], "--lr 0.01 here, 0.002 in the run"),
                           (["--model", "hw3_dnn"], "--model hw3_dnn here, hw3_cnn in the run"),
                           (["--limit", "32"], "--limit 32 here, 64 in the run"),
                           (["--batch-size", "8"], "--batch-size 8 here, 16 in the run"),
                           (["--augment", "hw3"], "--augment hw3 here, none in the run"),
                           (["--normalize", "mean_std"], "--normalize mean_std here, per_pixel in the run")]:
        rc, _, err = run_main(train_script, ["--out", str(out), "--resume", *extra], capsys)
        assert rc == 2 and err.startswith(f"error: --resume: {out / 'last.npz'} was started with other arguments")
        assert message in err, err
    assert minicnn.training.load_checkpoint(out / "last.npz")[2]["epoch"] == 1  # nothing was trained
    # Only --out (and a longer --epochs): the run's own arguments, data path included, are used.
    rc, stdout, err = run_main(train_script, ["--out", str(out), "--resume", "--epochs", "2", "--no-progress"], capsys)
    assert rc == 0, err
    # The header cannot know the restored state; the resume line says it (the schedule after epoch 1, not 0).
    assert "Adam and ReduceLROnPlateau, state from last.npz" in stdout
    assert "after epoch 1; lr 0.002, ReduceLROnPlateau(epoch=1, lr=0.002)" in stdout, stdout
    _, _, meta = minicnn.training.load_checkpoint(out / "last.npz")
    assert meta["epoch"] == 2 and meta["args"]["lr"] == 0.002 and meta["args"]["augment"] == "none"
    assert meta["args"]["limit"] == 64 and (out / "test_metrics.json").is_file()  # --no-test was not kept

    rc, _, err = run_main(train_script, ["--out", str(tmp_path / "empty"), "--resume"], capsys)
    assert rc == 2 and "no run to resume" in err


def write_csv_copy(data, path, seed=0, change_one=False):
    """The data set of folder ``data`` as a Kaggle fer2013.csv, rows shuffled (and one training pixel changed)."""
    ds = load_fer2013(data)
    order = np.random.default_rng(seed).permutation(len(ds))
    images = ds.images[order].copy()
    if change_one:
        images[int(np.flatnonzero(ds.usage[order] == "Training")[0]), 0, 0] ^= 1
    lines = ["emotion,pixels,Usage"] + [f"{lab},{' '.join(map(str, img.ravel()))},{u}"
                                        for img, lab, u in zip(images, ds.labels[order], ds.usage[order])]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_split_is_keyed_on_content_and_checked_against_the_fingerprint(fer_run, tmp_path, capsys, cache_env):
    data, run = fer_run
    ckpt = str(run / "best.npz")
    meta = minicnn.training.load_checkpoint(ckpt)[2]
    assert meta["data_fingerprint"]["split_method"] == "content"
    assert meta["data_fingerprint"]["val"]["images"] == 7
    results = []
    for source in (data, write_csv_copy(data, tmp_path / "shuffled.csv")):
        rc, out, err = run_main(evaluate_script, ["--checkpoint", ckpt, "--data", str(source), "--split", "val"], capsys)
        assert rc == 0, err
        results.append(json.loads(out))
    # The same images in another order and layout: the same validation set, the same numbers.
    assert results[0]["split_verified"] is True and results[1]["split_verified"] is True
    assert results[1]["accuracy"] == results[0]["accuracy"] and results[1]["loss"] == pytest.approx(results[0]["loss"])

    other = write_csv_copy(data, tmp_path / "other.csv", change_one=True)
    for split in ("val", "train"):
        rc, out, err = run_main(evaluate_script, ["--checkpoint", ckpt, "--data", str(other), "--split", split], capsys)
        if rc == 2:
            break
    assert rc == 2 and out == "" and f"is not the one {ckpt} was trained and selected on" in err
    rc, _, err = run_main(train_script, ["--out", str(run), "--resume", "--data", str(other)], capsys)
    assert rc == 2 and "error: --resume:" in err and "is not the one" in err
    rc, _, err = run_main(train_script, fine_tune_argv(other, ckpt, tmp_path / "ft", "--epochs", "1"), capsys)
    assert rc == 2 and "error: --init-from:" in err and "is not the one" in err


def test_a_checkpoint_without_fingerprint_gets_its_legacy_split_and_says_so(fer_run, tmp_path, capsys, cache_env):
    data, run = fer_run
    arrays, meta = load_npz(run / "best.npz")
    del meta["data_fingerprint"]
    legacy = save_npz(tmp_path / "legacy.npz", arrays, meta)
    rc, out, err = run_main(evaluate_script, ["--checkpoint", str(legacy), "--data", str(data), "--split", "val"],
                            capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert result["split_method"] == "order" and result["split_verified"] is False
    assert "records no fingerprint" in err


@pytest.mark.parametrize("flags, message", [
    (["--limit", "0"], "argument --limit: must be >= 1, got '0'"),
    (["--limit", "-5"], "argument --limit: must be >= 1"),
    (["--batch-size", "-5"], "argument --batch-size: must be >= 1"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["--epochs", "0"], "argument --epochs: must be >= 1"),
    (["--clip-norm", "-1"], "argument --clip-norm: must be > 0"),
    (["--lr", "0"], "argument --lr: must be > 0"),
    (["--lr", "inf"], "argument --lr: expected a finite number"),
    (["--rotation", "nan"], "argument --rotation: expected a finite number"),
    (["--shift", "1.5"], "argument --shift: must be >= 0 and < 1"),
    (["--zoom", "1.2", "0.8"], "argument --zoom: LO must not exceed HI"),
    (["--zoom", "0", "1"], "argument --zoom: must be > 0"),
    (["--undersample", "foo"], "argument --undersample: expected CLASS:KEEP"),
    (["--undersample", "joy:0.5"], "unknown class 'joy'"),
    (["--undersample", "happy:-3"], "must be a count >= 1 or a fraction"),
    (["--undersample", "happy:2.5"], "must be a whole number"),
    (["--val-fraction", "1"], "argument --val-fraction: must be > 0 and < 1"),
    (["--seed", "-1"], "argument --seed: must be >= 0"),
    (["--momentum", "1.5"], "argument --momentum: must be >= 0 and < 1"),
    (["--label-smoothing", "1"], "argument --label-smoothing: must be >= 0 and < 1"),
    (["--gamma", "0"], "argument --gamma: must be > 0 and <= 1"),
    (["--crop-padding", "30"], "argument --crop-padding: must be >= 0 and <= 23"),
    (["--early-stopping", "0"], "argument --early-stopping: must be >= 1"),
    (["--epochs", "ten"], "argument --epochs: expected an integer, got 'ten'"),
    (["--resume", "--overwrite"], "give one of them"),
])
def test_train_validates_every_numeric_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train_script.parse_args(flags)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_train_reports_bad_data_checkpoints_backends_and_disks_as_errors(fer_run, tmp_path, capsys, cache_env,
                                                                         monkeypatch):
    data, run = fer_run
    cases = [(train_argv(tmp_path / "nowhere", tmp_path / "o1"), "error: no data at"),
             (train_argv(data, tmp_path / "o2", "--init-from", str(data / "train" / "happy" / "Training_3000.png")),
              "Training_3000.png: not a minicnn .npz file: it is a PNG image"),
             (train_argv(data, tmp_path / "o3", "--batch-size", "62"), "leave a last batch of one image")]
    if not minicnn.backend.cupy_available():
        cases.append((train_argv(data, tmp_path / "o4", "--backend", "cupy"), "error: the 'cupy' backend needs CuPy"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases.append((train_argv(data, a_file), f"error: --out {a_file}: exists and is not a folder"))
    broken = tmp_path / "broken"
    for sub in ("train", "test"):
        for p in (data / sub).rglob("*.png"):
            (broken / p.relative_to(data)).parent.mkdir(parents=True, exist_ok=True)
            (broken / p.relative_to(data)).write_bytes(p.read_bytes())
    (broken / "train" / "sad" / "Training_4000.png").write_bytes(b"\x89PNG truncated")
    cases.append((train_argv(broken, tmp_path / "o5"), "Training_4000.png: cannot read image"))
    for argv, message in cases:
        rc, _, err = run_main(train_script, argv, capsys)
        assert rc == 2 and err.startswith("error:") and message in err, (argv, err)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "o6" / "last.npz"))
    monkeypatch.setattr(minicnn.checkpoint.np, "savez", disk_full)
    rc, _, err = run_main(train_script, train_argv(data, tmp_path / "o6"), capsys)
    assert rc == 2 and err.startswith(f"error: {tmp_path / 'o6' / 'last.npz'}: No space left on device")
    assert not [p for p in (tmp_path / "o6").iterdir() if p.suffix == ".tmp"]


def test_train_cli_prints_errors_without_traceback(tmp_path):
    for argv in (["--epochs", "0"], ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]):
        proc = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), *argv], capture_output=True, text=True)
        assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_privatetest_split_in_train_and_evaluate(fer_run, tmp_path, capsys, cache_env):
    data, run = fer_run
    rc, _, err = run_main(evaluate_script, ["--checkpoint", str(run / "best.npz"), "--data", str(data),
                                            "--split", "privatetest"], capsys)
    assert rc == 2 and "holds no PrivateTest images" in err
    with_private = tmp_path / "data"
    for p in data.rglob("*.png"):
        (with_private / p.relative_to(data)).parent.mkdir(parents=True, exist_ok=True)
        (with_private / p.relative_to(data)).write_bytes(p.read_bytes())
    rng = np.random.default_rng(5)
    for c, name in enumerate(CLASS_NAMES):  # Kaggle-style file names in the train folders
        for i in range(2):
            img = (rng.random((48, 48)) * 60 + 30 * c).astype(np.uint8)
            Image.fromarray(img).save(with_private / "train" / name / f"PrivateTest_{c}{i:03d}.png")
    rc, out, err = run_main(train_script, train_argv(with_private, tmp_path / "run"), capsys)
    assert rc == 0, err
    assert "ignored: 14 PrivateTest images" in out and "--split privatetest" in out
    rc, out, err = run_main(evaluate_script, ["--checkpoint", str(tmp_path / "run" / "best.npz"), "--data",
                                              str(with_private), "--split", "privatetest"], capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert result["usage"] == "PrivateTest" and result["num_examples"] == 14


def test_predict_reads_16_bit_images(fer_run, tmp_path, capsys):
    _, run = fer_run
    grey = np.random.default_rng(2).integers(0, 256, (48, 48)).astype(np.uint16)
    Image.fromarray(grey).convert("L").save(tmp_path / "8.png") if False else \
        Image.fromarray(grey.astype(np.uint8), "L").save(tmp_path / "8.png")
    Image.fromarray(grey * 257).save(tmp_path / "16.png")
    np.testing.assert_array_equal(predict_script.load_image(tmp_path / "16.png"), grey)
    rc, out, err = run_main(predict_script, [str(tmp_path / "8.png"), str(tmp_path / "16.png"), "--checkpoint",
                                             str(run / "best.npz"), "--json"], capsys)
    assert rc == 0, err
    p8, p16 = (p["probabilities"] for p in json.loads(out)["predictions"])
    # The same pixels in two rows of one float32 batch: BLAS may round the rows differently (a relative 2e-6
    # was seen on a probability of 1e-5); a 16-bit image read at the wrong scale would differ by far more.
    assert p8 == pytest.approx(p16, rel=1e-4, abs=1e-7)


def test_evaluate_refuses_a_checkpoint_with_non_finite_normalisation(fer_run, tmp_path, capsys):
    data, run = fer_run
    arrays, meta = load_npz(run / "best.npz")
    arrays["data/norm/scale"] = np.array(np.nan)
    bad = save_npz(tmp_path / "nan_norm.npz", arrays, meta)
    rc, out, err = run_main(evaluate_script, ["--checkpoint", str(bad), "--data", str(data)], capsys)
    assert rc == 2 and out == "" and "normalisation statistics (data/norm/) are not finite" in err


def test_evaluate_and_precise_bn_report_unwritable_outputs(fer_run, tmp_path, capsys, cache_env):
    data, run = fer_run
    a_file = tmp_path / "file"
    a_file.write_text("x")
    rc, _, err = run_main(evaluate_script, ["--checkpoint", str(run / "best.npz"), "--data", str(data),
                                            "--plots", str(a_file / "plots")], capsys)
    assert rc == 2 and err.splitlines()[-1].startswith(f"error: --plots {a_file / 'plots'}:")
    rc, _, err = run_main(precise_bn_script, ["--checkpoint", str(run / "best.npz"), "--data", str(data),
                                              "--out", str(a_file / "p.npz")], capsys)
    assert rc == 2 and err.splitlines()[-1].startswith(f"error: --out {a_file / 'p.npz'}:")
