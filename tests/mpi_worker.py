"""One rank of the data-parallel tests (tests/test_distributed.py starts it under mpiexec).

    mpiexec -n 2 python tests/mpi_worker.py --out weights.npz [--sync-bn] [--dropout 0.3] ...

Trains a small CNN on seeded synthetic data with DistributedTrainer and, on
rank 0, writes the final parameters and buffers (and the history) to --out.
Run without mpiexec it is a single process (the 1-rank reference).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import minicnn
from minicnn.data import Augmenter
from minicnn.distributed import DistributedTrainer, world
from minicnn.optim import SGD


def build(batchnorm: bool, dropout: float):
    layers = [minicnn.Conv2D(1, 4, 3, padding=1)]
    layers += [minicnn.BatchNorm2D(4)] if batchnorm else []
    layers += [minicnn.ReLU(), minicnn.MaxPool2D(2), minicnn.Flatten(), minicnn.Dense(4 * 6 * 6, 16)]
    layers += [minicnn.BatchNorm1D(16)] if batchnorm else []
    layers += [minicnn.ReLU()]
    layers += [minicnn.Dropout(dropout)] if dropout else []
    layers += [minicnn.Dense(16, 3)]
    return minicnn.Sequential(layers, input_shape=(1, 12, 12), name="tiny")


def data(n=90, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 12, 12))
    y = (x[:, 0, :6].mean(axis=(1, 2)) > 0).astype(np.int64) + (x[:, 0, :, :6].mean(axis=(1, 2)) > 0)
    return x, y


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batchnorm", action="store_true")
    p.add_argument("--sync-bn", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--augment", action="store_true")
    p.add_argument("--precise-bn", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=int, default=None, help="train only this many epochs now")
    args = p.parse_args(argv)

    minicnn.set_default_dtype("float64")  # the comparisons want rounding far below the tolerances
    minicnn.seed(0)
    comm = world()
    model = build(args.batchnorm, args.dropout)
    x, y = data()
    augmenter = Augmenter(flip=True, shift=0.1, seed=0) if args.augment else None
    trainer = DistributedTrainer(model, SGD(model, lr=0.05, momentum=0.9), augmenter=augmenter,
                                 batch_size=args.batch_size, seed=3, out_dir=args.run_dir, progress=False,
                                 log_every=2, comm=comm, sync_batchnorm=args.sync_bn, precise_bn=args.precise_bn)
    epochs = args.stop_after or args.epochs
    history = trainer.fit(x[:72], y[:72], x[72:], y[72:], epochs=epochs, resume=args.resume, log=lambda *a: None)
    if comm.rank == 0:
        arrays = {k: minicnn.to_host(v) for k, v in model.state_arrays().items()}
        np.savez(args.out, **{k.replace("/", "__"): v for k, v in arrays.items()})
        Path(args.out).with_suffix(".json").write_text(json.dumps({"history": history, "ranks": comm.size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
