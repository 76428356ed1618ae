"""A light run of benchmarks/fault_injection.py: a few bad inputs, and a training run killed with kill -9.

The full measurement (hundreds of inputs, a dozen killed runs) is the script itself; this keeps its
machinery and the two properties it measures honest in the test suite.
"""
import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("PIL")
ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fault_injection", ROOT / "benchmarks" / "fault_injection.py")
fi = importlib.util.module_from_spec(spec)
sys.modules["fault_injection"] = fi  # dataclasses look their module up there
spec.loader.exec_module(fi)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    env = {k: v for k, v in os.environ.items() if k != "FER2013_DATA"}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), MINICNN_CACHE=str(work / "cache"))
    data = fi.write_folder(work / "data", n_train=6, n_test=1)
    return work, data, env


def test_bad_inputs_are_clear_errors(setting):
    work, data, env = setting
    cases = [fi.Case("flags", "--epochs 0", "train", ["--data", data, "--out", work / "a", "--epochs", "0"]),
             fi.Case("flags", "--undersample foo", "train", ["--data", data, "--out", work / "b", "--undersample",
                                                             "foo"]),
             fi.Case("data", "missing data", "train", ["--data", work / "nowhere", "--out", work / "c"]),
             fi.Case("checkpoints", "a text file", "evaluate", ["--checkpoint", data / "x.npz", "--data", data])]
    (data / "x.npz").write_text("not a checkpoint")
    for case in cases:
        fi.run_case(case, env)
        assert case.outcome == "clear error", (case.name, case.outcome, case.detail)
    # The classifier itself: exit 0 on a bad input is "silent wrong", a traceback is one.
    assert fi.classify(fi.Case("g", "n", "train", []), 0, "", "")[0] == "silent wrong"
    assert fi.classify(fi.Case("g", "n", "train", []), 1, "", "Traceback (most recent call last):\n  x\nE: y")[0] == \
        "traceback"


def test_a_run_killed_with_sigkill_resumes_bit_identical(setting):
    work, data, env = setting
    argv = ["--data", data, "--epochs", "2", "--batch-size", "8", "--no-progress", "--no-test", "--limit", "24",
            "--model", "hw3_cnn"]
    rc, _, err = fi.run(fi.script_cmd("train", [*argv, "--out", work / "reference"]), env)
    assert rc == 0, err
    reference = fi.final_state(work / "reference")
    record = fi.kill_trial(0, argv, 3.0, "SIGKILL", env, work, reference, random.Random(3))
    assert record["recovered"] and record["bit_identical"] and not record["tmp_left"], record
