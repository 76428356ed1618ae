#!/usr/bin/env python
"""Kernel launches per hw3_cnn training step on the CuPy path: the generic code vs the fused kernels.

Runs without a GPU, on the strict CuPy stand-in of the tests (``tests/fakecupy.py``),
which counts one launch per array operation CuPy would run as a kernel (views and
``empty`` are free; ``einsum`` counts 3). One step = forward (training mode) +
softmax cross-entropy + backward + Adam, batch 128, as in ``bench_train_step.py``;
optionally the Trainer's per-step work around it (batch gather, HW3 augmentation,
running loss and accuracy). The same step is counted twice in one run: with
``minicnn.kernels.use_fused(False)`` (every operation written out, as before the
kernels existed) and with the fused kernels. Prints a markdown table per layer kind,
with the host syncs and host-device copies of the step (both should be 0), then
what the host still issues when the step is replayed as a CUDA graph
(``minicnn.graphs``), and writes JSON.

    python benchmarks/count_launches.py                    # hw3_cnn, batch 128
    python benchmarks/count_launches.py --model hw3_dnn --trainer-step
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import numpy as np  # noqa: E402

import fakecupy  # noqa: E402
import minicnn  # noqa: E402
from common import default_json_path, markdown_table, write_json  # noqa: E402
from minicnn import kernels  # noqa: E402
from minicnn.data import Augmenter  # noqa: E402
from minicnn.graphs import GraphedStep  # noqa: E402
from minicnn.optim import Adam  # noqa: E402


def count_step(model_name, batch, fused, trainer_step):
    """Launches per part of one training step (after one warm-up step), and the step's syncs and copies."""
    minicnn.seed(0)
    model = minicnn.build_model(model_name)
    opt, loss_fn = Adam(model, lr=1e-3), minicnn.SoftmaxCrossEntropy()
    aug = Augmenter(flip=True, rotation=30, shift=0.1, zoom=(0.8, 1.2), seed=0)
    rng = np.random.default_rng(0)
    cp = fakecupy
    data = cp.asarray(rng.standard_normal((2 * batch, 1, 48, 48)).astype(np.float32))
    labels = cp.asarray(rng.integers(0, 7, 2 * batch))
    parts: collections.Counter = collections.Counter()

    def counted(part, fn, *args):
        before = fakecupy.ledger.n_launches
        out = fn(*args)
        parts[part] += fakecupy.ledger.n_launches - before
        return out

    def step():
        loss_sum, correct = cp.zeros((), dtype=np.float64), cp.zeros((), dtype=np.int64)
        order = minicnn.backend.random_state(cp).permutation(2 * batch)
        idx = order[:batch]
        if trainer_step:
            xb, yb = counted("Trainer: batch gather", lambda: (data[idx], labels[idx]))
            xb = counted("Trainer: HW3 augmentation", aug, xb)
        else:
            xb, yb = data[:batch], labels[:batch]
        h = xb
        for layer in model.layers:
            h = counted(type(layer).__name__, layer.forward, h, True)
        loss = counted("SoftmaxCrossEntropy", loss_fn.forward, h, yb)
        d = counted("SoftmaxCrossEntropy", loss_fn.backward)
        for layer in reversed(model.layers):
            d = counted(type(layer).__name__, layer.backward, d)
        counted("Adam", opt.step)
        if trainer_step:
            def metrics():
                nonlocal loss_sum, correct
                loss_sum += loss * batch
                correct += (h.argmax(axis=1) == yb).sum()
            counted("Trainer: running loss and accuracy", metrics)

    with kernels.use_fused(fused):
        with fakecupy.counting():
            step()  # warm-up: optimiser state is created on the first step
        parts.clear()
        with fakecupy.counting() as ledger:
            step()
    return parts, len(ledger.syncs), len(ledger.copies), ledger


def count_graphed_step(model_name, batch):
    """What the host issues for one step replayed as a CUDA graph (minicnn.graphs): launches, syncs, copies."""
    minicnn.seed(0)
    model = minicnn.build_model(model_name)
    opt, loss_fn = Adam(model, lr=1e-3), minicnn.SoftmaxCrossEntropy()
    rng = np.random.default_rng(0)
    x = fakecupy.asarray(rng.standard_normal((batch, 1, 48, 48)).astype(np.float32))
    y = fakecupy.asarray(rng.integers(0, 7, batch))

    def eager(xb, yb):
        loss = loss_fn.forward(model.forward(xb, training=True), yb)
        model.backward(loss_fn.backward())
        opt.step()
        return (loss,)

    graphed = GraphedStep(eager, model, opt)
    with fakecupy.counting():
        for _ in range(3):  # two eager warm-up steps, then the capture and its first replay
            graphed(x, y)
    with fakecupy.counting() as ledger:
        graphed(x, y)
    return ledger


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hw3_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--trainer-step", action="store_true",
                   help="also count the Trainer's per-step work (batch gather, HW3 augmentation, running metrics)")
    p.add_argument("--json", default=None,
                   help="output JSON (default runs/benchmarks/launches_<model>[_trainer_step].json; "
                        "the reference is benchmarks/results/)")
    args = p.parse_args(argv)

    fakecupy.install()
    minicnn.set_backend("cupy")
    generic, g_syncs, g_copies, _ = count_step(args.model, args.batch_size, False, args.trainer_step)
    fused, f_syncs, f_copies, ledger = count_step(args.model, args.batch_size, True, args.trainer_step)
    rows = [{"part": k, "generic": generic[k], "fused": fused.get(k, 0),
             "ratio": round(fused.get(k, 0) / generic[k], 3) if generic[k] else ""} for k in generic]
    total_g, total_f = sum(generic.values()), sum(fused.values())
    rows.append({"part": "**total per step**", "generic": total_g, "fused": total_f,
                 "ratio": round(total_f / total_g, 3)})
    print(f"{args.model}, batch {args.batch_size}: kernel launches per training step on the CuPy path "
          f"(counted by the CuPy stand-in, no GPU)")
    print(markdown_table(rows, ["part", "generic", "fused", "ratio"]))
    print(f"\nhost syncs per step: generic {g_syncs}, fused {f_syncs}; host-device copies per step: "
          f"generic {g_copies}, fused {f_copies}")
    graph_ledger = count_graphed_step(args.model, args.batch_size)
    graphed = {"launches": graph_ledger.n_launches, "by_operation": dict(graph_ledger.by_operation()),
               "syncs": len(graph_ledger.syncs), "copies": [[d, n] for d, n, _ in graph_ledger.copies]}
    print(f"replayed as a CUDA graph (minicnn.graphs): {graphed['launches']} launches per step issued by the host "
          f"({', '.join(f'{n} {op}' for op, n in graphed['by_operation'].items())}), "
          f"{graphed['syncs']} host syncs, {len(graphed['copies'])} host-device copy of "
          f"{sum(n for _, n in graphed['copies'])} bytes (the optimiser's step values)")
    by_op = ledger.by_operation().most_common()
    out = args.json or default_json_path(f"launches_{args.model}" + ("_trainer_step" if args.trainer_step else ""))
    write_json(out, {"benchmark": "launches_per_step", "model": args.model, "batch": args.batch_size,
                     "trainer_step": args.trainer_step, "counted_by": "tests/fakecupy.py (no GPU)",
                     "rows": rows, "syncs": {"generic": g_syncs, "fused": f_syncs},
                     "copies": {"generic": g_copies, "fused": f_copies},
                     "fused_by_operation": dict(by_op), "graphed": graphed})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
