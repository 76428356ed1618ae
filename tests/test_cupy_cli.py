"""The FER-2013 command lines with ``--backend cupy``, on a small subset of the real data.

``train.py`` (then ``--resume`` and ``--init-from``), ``evaluate.py --tta`` and
``precise_bn.py`` run as their ``main(argv)``, with the ``cupy`` fixture: the real
CuPy on a GPU, the strict stand-in (tests/fakecupy.py) in CI. With the stand-in, the
ledger also proves that no layer, loss, optimiser or augmentation reads a value back
to the host: every sync of the runs comes from the Trainer's logging, evaluation,
checkpoints or the scripts' reports.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import minicnn
from minicnn.training import load_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "fer2013"
pytest.importorskip("PIL.Image")


def load_script(name):
    """The command behind examples/fer2013/<name>.py: the module minicnn.cli.<name>."""
    return importlib.import_module(f"minicnn.cli.{name}")


train_script, evaluate_script, precise_bn_script = (load_script(n) for n in ("train", "evaluate", "precise_bn"))
# --no-test: the PublicTest pass at the end (3,589 images) would double the test's time; evaluate.py below
# runs the same evaluation code on the device.
TRAIN = ["--backend", "cupy", "--limit", "192", "--batch-size", "64", "--no-progress", "--log-every", "2",
         "--schedule", "none"]
QUIET_SYNC_SOURCES = ("minicnn/layers/", "minicnn/optim/", "minicnn/losses.py", "minicnn/data/augment.py",
                      "minicnn/kernels.py")


def _no_sync_in_the_step(cupy):
    if not hasattr(cupy, "ledger"):
        return  # the real CuPy keeps no ledger
    offenders = sorted({w for _, w in cupy.ledger.syncs if w.startswith(QUIET_SYNC_SOURCES)})
    assert not offenders, f"host syncs inside the training step: {offenders}"


def test_train_resume_init_from_evaluate_tta_and_precise_bn_with_the_cupy_backend(cupy, fer2013_path, tmp_path,
                                                                                 capsys):
    data = ["--data", fer2013_path]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_script.main([*data, *TRAIN, "--out", str(full), "--epochs", "2", "--no-test"]) == 0
    _no_sync_in_the_step(cupy)
    # interrupted after one epoch, resumed: the same weights as the uninterrupted run
    assert train_script.main([*data, *TRAIN, "--out", str(part), "--epochs", "1", "--no-test"]) == 0
    assert train_script.main([*data, *TRAIN, "--out", str(part), "--epochs", "2", "--resume", "--no-test"]) == 0
    minicnn.set_backend("numpy")
    a, _, meta_a = load_checkpoint(full / "last.npz")
    b, _, meta_b = load_checkpoint(part / "last.npz")
    assert meta_a["epoch"] == meta_b["epoch"] == 2
    for k, v in a.state_arrays().items():
        np.testing.assert_allclose(b.state_arrays()[k], v, rtol=1e-6, atol=1e-7, err_msg=k)

    # the same run with the step replayed as a CUDA graph: the same weights, bit for bit
    graphed = tmp_path / "graphed"
    minicnn.set_backend("numpy")
    capsys.readouterr()
    assert train_script.main([*data, *TRAIN, "--out", str(graphed), "--epochs", "2", "--no-test",
                              "--cuda-graph"]) == 0
    assert "CUDA graph: captured 1 time(s), replayed for" in capsys.readouterr().out
    _no_sync_in_the_step(cupy)
    minicnn.set_backend("numpy")
    c, _, _ = load_checkpoint(graphed / "last.npz")
    for k, v in a.state_arrays().items():
        np.testing.assert_array_equal(c.state_arrays()[k], v, err_msg=k)

    # and with precise BN after each epoch: the same weights still, other running statistics
    precise = tmp_path / "precise"
    assert train_script.main([*data, *TRAIN, "--out", str(precise), "--epochs", "2", "--no-test", "--cuda-graph",
                              "--precise-bn", "64"]) == 0
    assert "(precise BN on 64 images" in capsys.readouterr().out
    minicnn.set_backend("numpy")
    d, _, meta_d = load_checkpoint(precise / "last.npz")
    for k, v in a.params.items():
        np.testing.assert_array_equal(d.params[k], v, err_msg=k)
    assert any(not np.allclose(d.buffers[k], v) for k, v in a.buffers.items())
    assert [h["precise_bn_images"] for h in meta_d["history"]] == [64, 64]

    phase2 = tmp_path / "phase2"
    assert train_script.main([*data, *TRAIN, "--out", str(phase2), "--epochs", "1", "--init-from",
                              str(full / "best.npz"), "--lr", "3e-4", "--no-test"]) == 0
    _no_sync_in_the_step(cupy)
    assert load_checkpoint(phase2 / "last.npz")[2]["init"]["checkpoint"] == str(full / "best.npz")

    capsys.readouterr()
    rc = evaluate_script.main(["--checkpoint", str(full / "best.npz"), *data, "--split", "val", "--tta",
                               "--tta-padding", "2", "--backend", "cupy"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)  # the metrics, as JSON on stdout
    assert result["tta"] and result["num_examples"] == 48 and 0.0 <= result["accuracy"] <= 1.0

    pbn = tmp_path / "pbn.npz"
    rc = precise_bn_script.main(["--checkpoint", str(full / "best.npz"), "--out", str(pbn), *data,
                                 "--backend", "cupy", "--batch-size", "64"])
    assert rc == 0, capsys.readouterr()
    minicnn.set_backend("numpy")
    before, _, _ = load_checkpoint(full / "best.npz")
    after, _, _ = load_checkpoint(pbn)
    moved = [k for k in before.buffers if not np.allclose(before.buffers[k], after.buffers[k])]
    assert moved  # the running statistics were recalibrated
    for k in before.params:
        np.testing.assert_array_equal(after.params[k], before.params[k])


def test_cuda_graph_needs_the_cupy_backend(tmp_path, capsys):
    assert train_script.main(["--cuda-graph", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")]) == 2
    assert "--cuda-graph needs --backend cupy" in capsys.readouterr().err


def test_train_script_as_a_program_under_the_stand_in_launcher(fer2013_path, tmp_path):
    """``python examples/fer2013/train.py --backend cupy`` as users type it, with ``import cupy`` answered by
    the stand-in (tests/standin/cupy.py); FAKECUPY_REPORT prints the run's ledger."""
    import os
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests / "standin"), str(tests)]),
               FAKECUPY_REPORT="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--data", fer2013_path, "--backend", "cupy",
                           "--limit", "64", "--batch-size", "32", "--epochs", "1", "--no-progress", "--no-test",
                           "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "backend cupy" in proc.stdout and "fakecupy:" in proc.stderr
    assert (tmp_path / "run" / "best.npz").is_file()
