#!/usr/bin/env python
"""Peak memory of evaluating a network: minicnn's forward_only, a forward that keeps caches, and PyTorch.

Evaluation (the validation pass of every epoch, prediction, test-time augmentation) needs
only each batch's output. ``forward(x, training=False)`` keeps every layer's cache for a
backward pass that never comes, so all of a network's im2col matrices are alive at once;
``forward_only`` drops each layer's cache as soon as the next layer has its input. PyTorch
evaluates under ``torch.inference_mode()``.

Each measurement runs in its own process (Linux only), which builds the network and random
inputs, resets its peak resident set size (VmHWM) to the current one, evaluates ``--images``
inputs in batches of ``--batch-size`` and reports how far the peak rose above the start. Prints a
markdown table and writes JSON; the ratio is minicnn forward_only's peak / PyTorch's (below 1:
minicnn needs less).

    python benchmarks/bench_eval_memory.py                          # hw3_cnn, ece662_resnet, vgg_fer_slim
    python benchmarks/bench_eval_memory.py --models ece662_resnet --batch-size 512 --images 512
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import minicnn  # noqa: E402
from common import default_json_path, environment, markdown_table, torch_twin, write_json  # noqa: E402

MODES = ("forward", "forward_only", "torch")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Start a new high-water mark at the current resident set size; return that size in bytes.

    Writing 5 to /proc/self/clear_refs resets VmHWM (Linux >= 4.0). getrusage's ru_maxrss
    cannot serve: it starts from the parent's size at fork, so a child of a large process
    (pytest) would not see a rise below it.
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def measure(model_name: str, mode: str, batch_size: int, images: int) -> dict:
    """In this process: the rise of the peak RSS while ``images`` inputs are evaluated in ``mode``."""
    minicnn.seed(0)
    model = minicnn.build_model(model_name)
    x = np.random.default_rng(0).standard_normal((images,) + model.input_shape).astype(np.float32)
    if mode == "torch":
        import torch  # noqa: PLC0415

        net = torch_twin(model, torch).eval()
        xt = torch.from_numpy(x)

        def run(start, stop):
            with torch.inference_mode():
                return net(xt[start:stop]).numpy()
    else:
        def run(start, stop):
            xb = x[start:stop]
            return model.forward_only(xb) if mode == "forward_only" else model.forward(xb, training=False)

    # Warm up on two images (library initialisation, BLAS buffers), not a whole batch, whose peak is
    # the measurement itself.
    run(0, 2)
    model.release_cache()
    before = reset_peak_rss()
    t0 = time.perf_counter()
    checksum = 0.0
    for start in range(0, images, batch_size):
        checksum += float(np.abs(run(start, start + batch_size)).sum())  # every mode: the same network, the same sum
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {"model": model_name, "mode": mode, "batch_size": batch_size, "images": images,
            "peak_rise_gib": round((peak - before) / 2**30, 3), "peak_rss_gib": round(peak / 2**30, 3),
            "seconds": round(seconds, 2), "checksum": checksum}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["hw3_cnn", "ece662_resnet", "vgg_fer_slim"],
                   choices=sorted(minicnn.MODELS))
    p.add_argument("--batch-size", type=int, default=256, help="the Trainer's evaluation batch")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.batch_size, args.images)))
        return 0

    rows = []
    for name in args.models:
        row = {"model": name, "batch": args.batch_size, "images": args.images}
        for mode in args.modes:
            proc = subprocess.run([sys.executable, __file__, "--child", name, mode, "--batch-size",
                                   str(args.batch_size), "--images", str(args.images)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{name} {mode}: the measuring process failed:\n{proc.stderr[-2000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            row[f"{mode}_gib"] = result["peak_rise_gib"]
            row[f"{mode}_s"] = result["seconds"]
            row[f"{mode}_checksum"] = result["checksum"]
        if "forward_only_gib" in row and "torch_gib" in row and row["torch_gib"] > 0:
            row["ratio_vs_torch"] = round(row["forward_only_gib"] / row["torch_gib"], 2)
        if "forward_only_gib" in row and "forward_gib" in row and row["forward_only_gib"] > 0:
            row["forward_over_forward_only"] = round(row["forward_gib"] / row["forward_only_gib"], 1)
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{m} {row[f'{m}_gib']} GiB" for m in args.modes), flush=True)

    columns = ["model", "batch", "images"] + [f"{m}_gib" for m in args.modes]
    columns += [c for c in ("forward_over_forward_only", "ratio_vs_torch") if any(c in r for r in rows)]
    print("\nRise of the peak resident set size while evaluating (GiB); forward keeps every layer's cache,")
    print("forward_only does not, torch runs under inference_mode; ratio_vs_torch = forward_only / torch")
    print(markdown_table(rows, columns))
    try:
        import torch  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        torch = None
    path = write_json(args.json or default_json_path("eval_memory_numpy"),
                      {"benchmark": "eval_memory", "environment": environment(torch), "rows": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
