#!/usr/bin/env python
"""Fault injection: bad inputs to every FER-2013 script, and kills during training.

    python benchmarks/fault_injection.py                 # ~5 min on 2 busy cores; table + runs/benchmarks/fault_injection.json
    python benchmarks/fault_injection.py --kills 30 --jobs 1

Everything runs as a user would run it: each case is a fresh process of
examples/fer2013/{train,evaluate,predict,precise_bn}.py, on a small synthetic
FER-2013 folder (7 classes x 12 Training + 3 PublicTest PNGs) written to a
temporary folder, so no real data is needed.

Bad inputs (flags, data files and rows, crafted checkpoints, workflow
mistakes such as a re-run into a used --out or a --resume with other
arguments or other data, a file-size limit standing in for a full disk)
are each classified as

* ``clear error``: non-zero exit, a line ``error: ...`` on stderr, no traceback;
* ``traceback``: a Python traceback on stderr;
* ``unclear``: non-zero exit without an ``error:`` line;
* ``silent wrong``: exit 0 although the input should have been refused, or a
  result that is wrong (for the inputs that must be accepted: a shuffled CSV
  must give the same validation numbers as the folders, a 16-bit PNG the
  same prediction as its 8-bit copy, a diverging run no non-finite file);
* ``correct``: an accepted input with the right result.

Kills: training runs of a few epochs are killed (SIGKILL, or SIGTERM as job
schedulers send) at random moments, then resumed with ``--resume --out``
only (or restarted, when the kill came before the first checkpoint), up to
two kills per run; each must finish with ``last.npz`` and ``best.npz`` bit-identical
(weights, BatchNorm statistics, optimiser state, history) to an
uninterrupted run, leave no temporary file behind, and a SIGTERM must exit
130 naming the epoch ``last.npz`` holds.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "fer2013"
sys.path.insert(0, str(ROOT))

from minicnn.checkpoint import load_npz, save_npz  # noqa: E402

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
N_TRAIN, N_TEST = 12, 3
TRAIN_BASE = ["--epochs", "1", "--batch-size", "16", "--no-progress", "--no-test"]


# --------------------------------------------------------------------------- processes


def script_cmd(script, argv):
    return [sys.executable, str(EXAMPLES / f"{script}.py"), *map(str, argv)]


def run(cmd, env, timeout=300, preexec=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, preexec_fn=preexec)
    return proc.returncode, proc.stdout, proc.stderr


@dataclass
class Case:
    group: str
    name: str
    script: str
    argv: list
    check: object = None  # None: must be refused; else check(rc, out, err) -> True when the result is right
    preexec: object = None
    outcome: str = ""
    detail: str = ""
    extra: dict = field(default_factory=dict)


ERROR_LINE = re.compile(r"^(\S+: )?error: ", re.M)


def classify(case, rc, out, err):
    if "Traceback (most recent call last)" in err:
        return "traceback", err.strip().splitlines()[-1][:200]
    if case.check is None:
        if rc == 0:
            return "silent wrong", "exit 0: the input was accepted"
        line = next((ln for ln in err.splitlines() if ERROR_LINE.match(ln)), None)
        return ("clear error", line[:200]) if line else ("unclear", f"exit {rc}: {err.strip()[-200:]!r}")
    try:
        ok = case.check(rc, out, err)
    except Exception as exc:  # a check that cannot even read the result: the result is wrong
        ok, err = False, f"{type(exc).__name__}: {exc}"
    if ok is True:
        return "correct", f"exit {rc}"
    return "silent wrong", f"exit {rc}: {ok if isinstance(ok, str) else err.strip()[-200:]}"


# --------------------------------------------------------------------------- fixtures


def write_folder(root: Path, n_train=N_TRAIN, n_test=N_TEST, seed=0, private=0):
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    for split, prefix, n in (("train", "Training", n_train), ("test", "PublicTest", n_test),
                             ("train", "PrivateTest", private)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = (rng.random((48, 48)) * 60 + 30 * c).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{prefix}_{c}{i:03d}.png")
    return root


def csv_text(rows):
    return "emotion,pixels,Usage\n" + "".join(f"{lab},{pix},{use}\n" for lab, pix, use in rows)


def dataset_rows(data, change_one=False, seed=0):
    from minicnn.data import load_fer2013  # noqa: PLC0415

    ds = load_fer2013(data, use_cache=False)
    order = np.random.default_rng(seed).permutation(len(ds))
    images = ds.images[order].copy()
    if change_one:
        images[int(np.flatnonzero(ds.usage[order] == "Training")[0]), 0, 0] ^= 1
    return [(int(lab), " ".join(map(str, img.ravel())), str(u))
            for img, lab, u in zip(images, ds.labels[order], ds.usage[order])]


def npy_bytes(header, payload=b""):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def crafted_checkpoints(base: Path, folder: Path) -> dict:
    """name -> path of a file that must not be accepted as a checkpoint (and nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays, meta = load_npz(base)
    out = {}

    def put(name, content):
        path = folder / name
        path.write_bytes(content)
        out[name] = path

    def zipped(name, members):
        path = folder / name
        with zipfile.ZipFile(path, "w") as zf:
            for member, content in members.items():
                zf.writestr(member, content)
        out[name] = path

    def variant(name, arrays2, meta2):
        out[name] = save_npz(folder / name, arrays2, meta2)

    meta_npy = npy_bytes({"descr": "<U2", "fortran_order": False, "shape": ()}, "{}".encode("utf-32-le"))
    put("text.npz", b"this is a text file, not a checkpoint\n")
    put("empty.npz", b"")
    put("image.npz", b"\x89PNG\r\n\x1a\n" + bytes(64))
    put("pickle.npz", pickle.dumps({"w": [1, 2, 3]}))
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    put("single.npy.npz", buf.getvalue())
    put("truncated.npz", base.read_bytes()[: base.stat().st_size // 2])
    put("random.npz", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    zipped("zip_of_text.npz", {"readme.txt": "hello"})
    zipped("header_bomb.npz", {"__meta__.npy": meta_npy,
                               "param/0.W.npy": npy_bytes({"descr": "<f8", "fortran_order": False,
                                                           "shape": (10**6, 10**6)})})
    zipped("object_array.npz", {"__meta__.npy": meta_npy,
                                "param/0.W.npy": npy_bytes({"descr": "|O", "fortran_order": False, "shape": (2,)},
                                                           pickle.dumps([1, 2]))})
    zipped("meta_not_json.npz", {"__meta__.npy": npy_bytes({"descr": "<U3", "fortran_order": False, "shape": ()},
                                                           "{{{".encode("utf-32-le"))})
    nan = dict(arrays)
    k = next(k for k in nan if k.startswith("param/"))
    nan[k] = nan[k].copy()
    nan[k].flat[0] = np.nan
    variant("nan_weights.npz", nan, meta)
    inf_bn = dict(arrays)
    k = next(k for k in inf_bn if k.endswith("running_var"))
    inf_bn[k] = np.full_like(inf_bn[k], np.inf)
    variant("inf_running_var.npz", inf_bn, meta)
    shapes = dict(arrays)
    k = next(k for k in shapes if k.startswith("param/"))
    shapes[k] = np.zeros((2, 2), dtype=np.float32)
    variant("wrong_shape.npz", shapes, meta)
    variant("unknown_model.npz", arrays, dict(meta, model={"name": "resnet9000", "config": {}}))
    variant("huge_config.npz", arrays, dict(meta, model={"name": "hw3_cnn", "config": {"num_classes": 10**9}}))
    variant("bad_config_key.npz", arrays, dict(meta, model={"name": "hw3_cnn", "config": {"depth": 3}}))
    variant("foreign_format.npz", arrays, dict(meta, format="something/2"))
    variant("no_normaliser.npz", {k: v for k, v in arrays.items() if not k.startswith("data/norm/")}, meta)
    variant("no_class_names.npz", arrays, {k: v for k, v in meta.items() if k != "class_names"})
    nan_norm = dict(arrays)
    nan_norm["data/norm/scale"] = np.array(np.nan)
    variant("nan_normaliser.npz", nan_norm, meta)
    (folder / "a_folder.npz").mkdir(exist_ok=True)
    out["a_folder.npz"] = folder / "a_folder.npz"
    out["missing.npz"] = folder / "missing.npz"
    return out


def limit_file_size(nbytes):
    """preexec: a file-size limit, so that writing a checkpoint fails as on a full disk (EFBIG)."""
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


# --------------------------------------------------------------------------- bad-input cases


def build_cases(work: Path, data: Path, base_run: Path, env) -> list[Case]:
    cases = []
    outs = iter(range(10**6))

    def fresh_out():
        return work / "outs" / f"o{next(outs)}"

    def train(group, name, *argv, check=None, preexec=None, data_path=data):
        cases.append(Case(group, name, "train", ["--data", data_path, "--out", fresh_out(), *TRAIN_BASE, *argv],
                          check, preexec))

    ckpt = base_run / "best.npz"
    # -- flags of train.py
    bad_values = {
        "--epochs": ["0", "-1", "1.5", "x"], "--batch-size": ["0", "-5", "x"], "--limit": ["0", "-5"],
        "--lr": ["0", "-1", "nan", "inf"], "--clip-norm": ["0", "-1", "nan"], "--momentum": ["1", "-0.1", "2"],
        "--weight-decay": ["-1", "nan"], "--step-size": ["0"], "--gamma": ["0", "2", "nan"],
        "--warmup-epochs": ["-1"], "--plateau-patience": ["-1"], "--plateau-factor": ["0", "1", "1.5"],
        "--min-lr": ["-1", "inf"], "--early-stopping": ["0", "-2"], "--label-smoothing": ["1", "-0.1"],
        "--rotation": ["nan", "-5", "400", "inf"], "--shift": ["-0.1", "1", "nan"], "--crop-padding": ["-1", "30"],
        "--undersample": ["foo", "happy:", ":5", "happy:-3", "joy:0.5", "happy:2.5", "happy:x", "happy:nan"],
        "--val-fraction": ["0", "1", "-0.1", "nan"], "--seed": ["-1", "x", "99999999999"], "--log-every": ["0"],
        "--classes": ["5"], "--model": ["nope"], "--backend": ["tpu"], "--optimizer": ["lbfgs"],
    }
    for flag, values in bad_values.items():
        for v in values:
            train("train flags", f"{flag} {v}", flag, v)
    for zoom in (["0", "1"], ["1.2", "0.8"], ["nan", "1"], ["1", "inf"]):
        train("train flags", f"--zoom {' '.join(zoom)}", "--zoom", *zoom)
    train("train flags", "--resume --overwrite", "--resume", "--overwrite")
    train("train flags", "--init-from with --resume", "--init-from", ckpt, "--resume")
    train("train flags", "batch leaving one image for BatchNorm", "--batch-size", "76")
    train("train flags", "--limit 1 (BatchNorm batch of one)", "--limit", "1")

    # -- data files and rows
    bad = work / "bad_data"
    bad.mkdir()
    good_rows = dataset_rows(data)
    variants = {
        "empty file": "",
        "header only": "emotion,pixels,Usage\n",
        "wrong header": "label,image\n0,1 2 3\n",
        "2303 pixels": csv_text([(0, " ".join(["1"] * 2303), "Training")] + good_rows),
        "pixel 300": csv_text([(0, " ".join(["300"] * 2304), "Training")] + good_rows),
        "pixel 'a'": csv_text([(0, " ".join(["a"] * 2304), "Training")] + good_rows),
        "pixel -1": csv_text([(0, " ".join(["-1"] * 2304), "Training")] + good_rows),
        "label 7": csv_text(good_rows + [(7, " ".join(["1"] * 2304), "Training")]),
        "label -1": csv_text(good_rows + [(-1, " ".join(["1"] * 2304), "Training")]),
        "label 'x'": csv_text(good_rows + [("x", " ".join(["1"] * 2304), "Training")]),
        "label 2.5": csv_text(good_rows + [("2.5", " ".join(["1"] * 2304), "Training")]),
        "Usage 'Validation'": csv_text(good_rows + [(1, " ".join(["1"] * 2304), "Validation")]),
        "no Training rows": csv_text([r for r in good_rows if r[2] != "Training"]),
        "binary garbage": None,
    }
    for name, text in variants.items():
        path = bad / (re.sub(r"\W+", "_", name) + ".csv")
        if text is None:
            path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
        else:
            path.write_text(text)
        train("data", f"CSV: {name}", data_path=path)
    train("data", "missing path", data_path=work / "nowhere")
    for name, make in {
        "unknown class folder": lambda r: (r / "train" / "joyful").mkdir(parents=True),
        "truncated PNG": lambda r: (r / "train" / "sad" / "Training_9999.png").write_bytes(b"\x89PNG\r\n\x1a\n...."),
        "text file named .png": lambda r: (r / "train" / "fear" / "Training_9998.png").write_text("hello"),
        "stray folder next to splits": lambda r: (r / "models").mkdir(),
    }.items():
        root = bad / re.sub(r"\W+", "_", name)
        shutil.copytree(data, root)
        make(root)
        train("data", f"folder: {name}", data_path=root)
    (bad / "no_images" / "train" / "happy").mkdir(parents=True)
    train("data", "folder: no images", data_path=bad / "no_images")
    (bad / "no_subfolders").mkdir()
    (bad / "no_subfolders" / "x.png").write_bytes(b"")
    train("data", "folder: no subfolders", data_path=bad / "no_subfolders")
    only_test = bad / "only_test"
    shutil.copytree(data / "test", only_test / "test")
    train("data", "folder: no Training images", data_path=only_test)

    # -- inputs that must be accepted, with the right result
    shuffled = bad / "shuffled.csv"
    shuffled.write_text(csv_text(good_rows))

    def same_val_numbers(rc, out, err):
        if rc != 0:
            return f"refused: {err.strip()[-200:]}"
        ref = json.loads(run(script_cmd("evaluate", ["--checkpoint", ckpt, "--data", data, "--split", "val"]),
                             env)[1])
        got = json.loads(out)
        if (got["num_examples"], got["accuracy"]) != (ref["num_examples"], ref["accuracy"]) or \
                abs(got["loss"] - ref["loss"]) > 1e-6:
            return (f"a shuffled CSV of the same images gave val accuracy {got['accuracy']:.4f} loss {got['loss']:.4f}"
                    f", the folders {ref['accuracy']:.4f} / {ref['loss']:.4f}")
        return True
    cases.append(Case("accepted inputs", "evaluate --split val on a shuffled CSV of the same images", "evaluate",
                      ["--checkpoint", ckpt, "--data", shuffled, "--split", "val"], same_val_numbers))
    from PIL import Image  # noqa: PLC0415

    grey = np.random.default_rng(4).integers(0, 256, (48, 48)).astype(np.uint16)
    Image.fromarray(grey.astype(np.uint8), "L").save(bad / "face8.png")
    Image.fromarray(grey * 257).save(bad / "face16.png")

    def same_prediction(rc, out, err):
        if rc != 0:
            return f"refused: {err.strip()[-200:]}"
        p8, p16 = (p["probabilities"] for p in json.loads(out)["predictions"])
        return True if all(abs(p8[c] - p16[c]) < 1e-6 for c in p8) else f"8-bit {p8} vs 16-bit {p16}"
    cases.append(Case("accepted inputs", "predict on a 16-bit PNG and its 8-bit copy", "predict",
                      [bad / "face8.png", bad / "face16.png", "--checkpoint", ckpt, "--json"], same_prediction))
    folder16 = bad / "folder16"
    shutil.copytree(data, folder16)
    for p in (folder16 / "train" / "happy").glob("*.png"):
        Image.fromarray(np.asarray(Image.open(p), dtype=np.uint16) * 257).save(p)

    def no_white_images(rc, out, err):
        from minicnn.data import load_fer2013  # noqa: PLC0415
        a = load_fer2013(data, use_cache=False).images
        b = load_fer2013(folder16, use_cache=False).images
        return True if np.array_equal(a, b) else "16-bit images decode differently from their 8-bit originals"
    train("accepted inputs", "folder with 16-bit PNGs", check=no_white_images, data_path=folder16)

    def finite_files(out_dir):
        def check(rc, out, err):
            if rc not in (0, 1):
                return f"exit {rc}"
            if rc == 1 and not ERROR_LINE.search(err):
                return "exit 1 without an error line"
            for f in Path(out_dir).glob("*.npz"):
                arrays, _ = load_npz(f)
                bad_arrays = [k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
                if bad_arrays:
                    return f"{f.name} holds non-finite {bad_arrays[:3]}"
            for f in Path(out_dir).glob("*.json"):
                if re.search(r"\bNaN\b|\bInfinity\b", f.read_text()):
                    return f"{f.name} holds a bare NaN"
            return True
        return check
    for lr, opt in (("1e3", "adam"), ("1e6", "sgd"), ("1e9", "sgd")):
        out_dir = fresh_out()
        cases.append(Case("accepted inputs", f"diverging run (--lr {lr} --optimizer {opt})", "train",
                          ["--data", data, "--out", out_dir, "--epochs", "3", "--batch-size", "16", "--no-progress",
                           "--lr", lr, "--optimizer", opt], finite_files(out_dir)))

    # -- crafted checkpoints, to every script that reads one
    image = data / "test" / "happy" / sorted(os.listdir(data / "test" / "happy"))[0]
    for name, path in crafted_checkpoints(ckpt, work / "crafted").items():
        cases.append(Case("checkpoints", f"evaluate: {name}", "evaluate", ["--checkpoint", path, "--data", data]))
        cases.append(Case("checkpoints", f"predict: {name}", "predict", [image, "--checkpoint", path]))
        cases.append(Case("checkpoints", f"precise_bn: {name}", "precise_bn",
                          ["--checkpoint", path, "--out", fresh_out() / "pbn.npz", "--data", data]))
        train("checkpoints", f"train --init-from: {name}", "--init-from", path)

    # -- workflow mistakes
    train_ws = ["--data", data, *TRAIN_BASE]
    cases.append(Case("workflow", "train into the used --out of another run", "train",
                      [*train_ws, "--out", base_run]))
    for flag, value in (("--lr", "0.01"), ("--limit", "32"), ("--model", "hw3_dnn"), ("--batch-size", "8"),
                        ("--val-fraction", "0.2"), ("--augment", "none"), ("--normalize", "mean_std"),
                        ("--seed", "1"), ("--classes", "6"), ("--undersample", "happy:5"), ("--loss", "mse")):
        cases.append(Case("workflow", f"--resume with {flag} {value}", "train",
                          ["--out", base_run, "--resume", flag, value]))
    changed = bad / "changed.csv"
    changed.write_text(csv_text(dataset_rows(data, change_one=True)))
    cases.append(Case("workflow", "--resume on data with one pixel changed", "train",
                      ["--out", base_run, "--resume", "--data", changed]))
    cases.append(Case("workflow", "--resume of an empty folder", "train", ["--out", fresh_out(), "--resume"]))
    for split in ("val", "train"):
        cases.append(Case("workflow", f"evaluate --split {split} on data with one pixel changed", "evaluate",
                          ["--checkpoint", ckpt, "--data", changed, "--split", split]))
    train("workflow", "--init-from on data with one pixel changed", "--init-from", ckpt, data_path=changed)
    train("workflow", "--init-from with another --model", "--init-from", ckpt, "--model", "hw3_dnn")
    train("workflow", "--init-from with another --seed", "--init-from", ckpt, "--seed", "2")
    cases.append(Case("workflow", "evaluate --split privatetest without PrivateTest images", "evaluate",
                      ["--checkpoint", ckpt, "--data", data, "--split", "privatetest"]))
    cases.append(Case("workflow", "an --out that is a file", "train", ["--data", data, "--out", image, *TRAIN_BASE]))
    train("workflow", "writing a checkpoint past a file-size limit (as a full disk)",
          preexec=limit_file_size(2 * 2**20))
    # -- other scripts' flags and inputs
    for argv, name in (([image, "--checkpoint", ckpt, "--top", "0"], "predict --top 0"),
                       ([work / "none.png", "--checkpoint", ckpt], "predict: missing image"),
                       ([bad / "wrong_header.csv", "--checkpoint", ckpt], "predict: a CSV as image"),
                       ([bad / "no_subfolders", "--checkpoint", ckpt], "predict: a folder of unreadable images")):
        cases.append(Case("other scripts", name, "predict", argv))
    for argv, name in ((["--batch-size", "0"], "evaluate --batch-size 0"),
                       (["--tta", "--tta-padding", "30"], "evaluate --tta-padding 30"),
                       (["--split", "bogus"], "evaluate --split bogus")):
        cases.append(Case("other scripts", name, "evaluate", ["--checkpoint", ckpt, "--data", data, *argv]))
    cases.append(Case("other scripts", "evaluate --plots under a file", "evaluate",
                      ["--checkpoint", ckpt, "--data", data, "--plots", image / "plots"]))
    cases.append(Case("other scripts", "precise_bn --out under a file", "precise_bn",
                      ["--checkpoint", ckpt, "--out", image / "p.npz", "--data", data]))
    cases.append(Case("other scripts", "precise_bn --out the checkpoint itself", "precise_bn",
                      ["--checkpoint", ckpt, "--out", ckpt, "--data", data]))
    cases.append(Case("other scripts", "precise_bn --batch-size 1", "precise_bn",
                      ["--checkpoint", ckpt, "--out", fresh_out() / "p.npz", "--data", data, "--batch-size", "1"]))
    return cases


def run_case(case, env):
    t = time.perf_counter()
    try:
        rc, out, err = run(script_cmd(case.script, case.argv), env, preexec=case.preexec)
    except subprocess.TimeoutExpired:
        case.outcome, case.detail = "unclear", "timed out"
        return case
    case.outcome, case.detail = classify(case, rc, out, err)
    case.extra["seconds"] = round(time.perf_counter() - t, 2)
    return case


# --------------------------------------------------------------------------- kills


def final_state(out_dir: Path):
    """last.npz's arrays, epoch and history (without timings), and best.npz's arrays and epoch."""
    arrays, meta = load_npz(out_dir / "last.npz")
    history = [{k: v for k, v in h.items() if k not in ("seconds", "img_per_s")} for h in meta["history"]]
    best_arrays, best_meta = load_npz(out_dir / "best.npz") if (out_dir / "best.npz").is_file() else ({}, {})
    return arrays, meta["epoch"], history, best_arrays, best_meta.get("epoch")


def _same_arrays(a, b):
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def same_state(a, b):
    (arr_a, ep_a, hist_a, best_a, best_ep_a), (arr_b, ep_b, hist_b, best_b, best_ep_b) = a, b
    return (ep_a == ep_b and hist_a == hist_b and _same_arrays(arr_a, arr_b)
            and best_ep_a == best_ep_b and _same_arrays(best_a, best_b))


def _epoch_on_disk(out_dir):
    try:
        return load_npz(out_dir / "last.npz")[1]["epoch"]
    except Exception:  # no file yet (a half-written one would be a failure: it is reported by the recovery)
        return None


def kill_trial(i, argv, window, signame, env, work, reference, rng):
    """Kill a run at random moments (up to two kills), finish it with --resume; compare with the reference."""
    out_dir = work / "kills" / f"k{i}"
    sig = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}[signame]
    record = {"trial": i, "signal": signame, "kills": []}
    n_kills = 1 + int(rng.random() < 0.5)
    for k in range(n_kills):
        resume = (out_dir / "last.npz").is_file()
        cmd = script_cmd("train", ["--out", out_dir, "--resume"] if resume else [*argv, "--out", out_dir])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        delay = rng.uniform(0.2, window)
        try:
            proc.wait(timeout=delay)
            finished = True
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            finished = False
        out, err = proc.communicate()
        entry = {"after_s": round(delay, 2), "resumed": resume, "finished_first": finished, "rc": proc.returncode,
                 # the epoch the run folder holds after the kill (None: killed before the first checkpoint)
                 "epoch_on_disk": _epoch_on_disk(out_dir)}
        if not finished and signame == "SIGTERM":
            held = re.search(r"holds the state after epoch (\d+)", out + err)
            real = load_npz(out_dir / "last.npz")[1]["epoch"] if (out_dir / "last.npz").is_file() else None
            entry["clean_stop"] = bool(
                "Traceback" not in err and (
                    (proc.returncode == 130 and held is not None and int(held.group(1)) == real)
                    or (proc.returncode == 130 and real is None)
                    or proc.returncode == -signal.SIGTERM))  # a SIGTERM before Python installed its handler
        record["kills"].append(entry)
        if finished:
            break
    # Recover as a user would: --resume when a checkpoint exists, else start again.
    resume = (out_dir / "last.npz").is_file()
    cmd = script_cmd("train", ["--out", out_dir, "--resume"] if resume else [*argv, "--out", out_dir])
    rc, out, err = run(cmd, env)
    record["recovery_rc"] = rc
    record["recovered"] = rc == 0
    record["recovery_error"] = "" if rc == 0 else (err.strip().splitlines() or [""])[-1][:200]
    record["bit_identical"] = bool(rc == 0 and same_state(final_state(out_dir), reference))
    leftovers = [p.name for p in out_dir.iterdir() if p.name.endswith(".tmp")] if out_dir.is_dir() else []
    record["tmp_left"] = leftovers
    return record


# --------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=12, help="training runs to kill (default 12: 9 SIGKILL, 3 SIGTERM)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each killed run")
    p.add_argument("--kill-limit", type=int, default=48, help="training images of each killed run")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path("runs") / "benchmarks" / "fault_injection.json"),
                   help="output JSON (default runs/benchmarks/; the reference is benchmarks/results/fault_injection.json)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="minicnn-faults-"))
    env = {k: v for k, v in os.environ.items() if k != "FER2013_DATA"}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), MINICNN_CACHE=str(work / "cache"))
    t0 = time.perf_counter()
    try:
        data = write_folder(work / "data")
        base_run = work / "base_run"
        rc, _, err = run(script_cmd("train", ["--data", data, "--out", base_run, *TRAIN_BASE]), env)
        if rc != 0:
            raise SystemExit(f"the base run failed: {err}")
        cases = build_cases(work, data, base_run, env)
        print(f"{len(cases)} bad inputs, {args.jobs} at a time ...", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            # workflow cases read and may (if a fix is missing) write the base run: run them last, in order
            first = [c for c in cases if c.group != "workflow"]
            list(pool.map(lambda c: run_case(c, env), first))
        for c in cases:
            if c.group == "workflow":
                run_case(c, env)

        # Kills: the reference, uninterrupted run, then runs killed at random moments.
        kill_argv = ["--data", data, "--epochs", str(args.epochs), "--batch-size", "16", "--no-progress", "--no-test",
                     "--seed", "1", "--limit", str(args.kill_limit)]
        t = time.perf_counter()
        rc, _, err = run(script_cmd("train", [*kill_argv, "--out", work / "reference"]), env)
        if rc != 0:
            raise SystemExit(f"the reference run failed: {err}")
        window = time.perf_counter() - t
        reference = final_state(work / "reference")
        rng = random.Random(args.seed)
        signals = ["SIGTERM" if i % 4 == 3 else "SIGKILL" for i in range(args.kills)]
        print(f"{args.kills} killed runs (reference run {window:.1f} s) ...", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            trials = list(pool.map(lambda i: kill_trial(i, kill_argv, window, signals[i], env, work, reference,
                                                        random.Random(rng.random() + i)), range(args.kills)))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    outcomes = ("clear error", "traceback", "unclear", "silent wrong", "correct")
    groups = sorted({c.group for c in cases}, key=[c.group for c in cases].index)
    table = {g: {o: sum(1 for c in cases if c.group == g and c.outcome == o) for o in outcomes} for g in groups}
    totals = {o: sum(t[o] for t in table.values()) for o in outcomes}
    kills_sent = sum(1 for tr in trials for k in tr["kills"] if not k["finished_first"])
    sigterms = [k for tr in trials for k in tr["kills"] if tr["signal"] == "SIGTERM" and not k["finished_first"]]
    summary = {
        "bad_inputs_tried": len(cases), **{o.replace(" ", "_"): totals[o] for o in outcomes},
        "killed_runs": len(trials), "kills_sent": kills_sent,
        "sigkill_sent": sum(1 for tr in trials for k in tr["kills"] if tr["signal"] == "SIGKILL" and not k["finished_first"]),
        "sigterm_sent": len(sigterms), "sigterm_clean_stops": sum(1 for k in sigterms if k.get("clean_stop")),
        "kills_after_first_checkpoint": sum(1 for tr in trials for k in tr["kills"]
                                            if not k["finished_first"] and k["epoch_on_disk"] is not None),
        "runs_recovered": sum(tr["recovered"] for tr in trials),
        "bit_identical_resumes": sum(tr["bit_identical"] for tr in trials),
        "runs_with_tmp_files_left": sum(1 for tr in trials if tr["tmp_left"]),
        "seconds": round(time.perf_counter() - t0, 1),
    }

    print()
    print("| group | tried | " + " | ".join(outcomes) + " |")
    print("|---|---:|" + "---:|" * len(outcomes))
    for g in groups:
        print(f"| {g} | {sum(table[g].values())} | " + " | ".join(str(table[g][o]) for o in outcomes) + " |")
    print(f"| **all** | **{len(cases)}** | " + " | ".join(f"**{totals[o]}**" for o in outcomes) + " |")
    print()
    print("| kills | count |")
    print("|---|---:|")
    for key in ("killed_runs", "kills_sent", "sigkill_sent", "sigterm_sent", "sigterm_clean_stops",
                "kills_after_first_checkpoint", "runs_recovered",
                "bit_identical_resumes", "runs_with_tmp_files_left"):
        print(f"| {key.replace('_', ' ')} | {summary[key]} |")
    problems = [c for c in cases if c.outcome not in ("clear error", "correct")]
    if problems:
        print("\nnot a clear error / not correct:")
        for c in problems:
            print(f"  [{c.outcome}] {c.group}: {c.name}: {c.detail}")
    for tr in trials:
        if not tr["bit_identical"] or tr["tmp_left"]:
            print(f"  kill trial {tr['trial']} ({tr['signal']}): recovered={tr['recovered']} "
                  f"bit_identical={tr['bit_identical']} tmp_left={tr['tmp_left']} {tr['recovery_error']}")
    print(f"\n{summary['seconds']} s")

    result = {"summary": summary, "table": table,
              "cases": [{"group": c.group, "name": c.name, "script": c.script, "outcome": c.outcome,
                         "detail": c.detail} for c in cases],
              "kill_trials": trials, "epochs_per_killed_run": args.epochs,
              "environment": {"python": sys.version.split()[0], "numpy": np.__version__, "cpus": os.cpu_count()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0 if not problems and summary["bit_identical_resumes"] == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
