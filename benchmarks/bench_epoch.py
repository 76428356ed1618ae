#!/usr/bin/env python
"""Time of one FER-2013 training epoch of hw3_cnn, data pipeline and augmentation included.

minicnn: the very loop of ``examples/fer2013/train.py`` (``Trainer``: shuffled
minibatches from the device-resident training set, the HW3 augmentation on the
device, forward, backward, Adam). PyTorch: the same network and optimiser, with
the same augmentation written the idiomatic fast way for it (batched
``affine_grid`` + ``grid_sample`` on the device).

With ``--limit N`` only N images are trained on and the full-epoch time
(25,838 images: Training minus the 10 % validation split) is projected from
the measured img/s; the table says which.

    python benchmarks/bench_epoch.py --data ../shared/data/fer2013 --limit 5120
    python benchmarks/bench_epoch.py --data ../shared/data/fer2013 --backend cupy
    python benchmarks/bench_epoch.py --data ../shared/data/fer2013 --backend cupy --cuda-graph   # + a graphed epoch

``--cuda-graph`` adds a row: the same epoch with every full batch's step replayed as a
CUDA graph (``Trainer(cuda_graph=True)``; the first two steps and the capture included).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import minicnn  # noqa: E402
from common import default_json_path, environment, markdown_table, setup, torch_twin, write_json  # noqa: E402
from minicnn.data import Augmenter, Normalizer, load_fer2013, stratified_split  # noqa: E402
from minicnn.graphs import GraphedStep  # noqa: E402
from minicnn.optim import Adam  # noqa: E402
from minicnn.training import Trainer  # noqa: E402

ROTATION, SHIFT, ZOOM = 30.0, 0.1, (0.8, 1.2)


def torch_epoch(torch, model, x, y, batch_size, device, seed=0):
    """One epoch of the torch twin with batched affine augmentation; returns seconds."""
    F = torch.nn.functional
    net = torch_twin(model, torch).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(seed)
    tx = torch.from_numpy(x).to(device)
    ty = torch.from_numpy(y).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    order = torch.randperm(len(ty), generator=gen, device=device)
    for s in range(0, len(ty), batch_size):
        idx = order[s : s + batch_size]
        xb, yb = tx[idx], ty[idx]
        n = len(idx)
        u = lambda lo, hi: torch.rand(n, generator=gen, device=device) * (hi - lo) + lo  # noqa: E731
        angle = u(-ROTATION, ROTATION) * math.pi / 180
        zoom = u(*ZOOM)
        flip = torch.where(torch.rand(n, generator=gen, device=device) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos * flip, -sin, u(-2 * SHIFT, 2 * SHIFT)], 1),
                             torch.stack([sin * flip, cos, u(-2 * SHIFT, 2 * SHIFT)], 1)], 1)
        grid = F.affine_grid(theta, list(xb.shape), align_corners=False)
        xb = F.grid_sample(xb, grid, mode="bilinear", padding_mode="border", align_corners=False)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(xb), yb).backward()
        opt.step()
    sync()
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="train on N images and project the epoch time")
    p.add_argument("--json", default=None)
    p.add_argument("--tf32", choices=["off", "on"], default="off",
                   help="TensorFloat-32 for float32 products and convolutions, pinned on both sides")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time the epoch with the step replayed as a CUDA graph (--backend cupy)")
    args = p.parse_args(argv)
    if args.cuda_graph and args.backend != "cupy":
        p.error("--cuda-graph needs --backend cupy")

    import torch  # noqa: PLC0415

    _, device, sync_ours, _ = setup(args.backend, torch, tf32=args.tf32 == "on")
    ds = load_fer2013(args.data)
    train_ds, _ = stratified_split(ds.split("Training"), 0.1, seed=0)
    full_n = len(train_ds)
    if args.limit:
        train_ds = train_ds.subset(np.random.default_rng(0).permutation(full_n)[: args.limit])
    x = Normalizer("per_pixel").fit(train_ds.images).transform(train_ds.images)
    y = train_ds.labels.astype(np.int64)
    n = len(y)

    xd, yd = minicnn.to_device(x), minicnn.to_device(y)

    def our_epoch(graph):
        minicnn.seed(0)
        model = minicnn.build_model("hw3_cnn")
        optimizer = Adam(model, lr=1e-3)
        trainer = Trainer(model, optimizer, augmenter=Augmenter(True, ROTATION, SHIFT, ZOOM, seed=0),
                          batch_size=args.batch_size, progress=False, log_every=50)
        if graph:  # what fit(cuda_graph=True) sets up
            trainer.graphed_step = GraphedStep(trainer._eager_step, model, optimizer)
        trainer._reseed(0)
        _, _, secs = trainer._epoch(xd, yd, 0, 1)  # the loop of train.py (it syncs at its end)
        if sync_ours:
            sync_ours()
        return secs

    timed = [("minicnn " + args.backend, our_epoch(False))]
    if args.cuda_graph:
        timed.append((f"minicnn {args.backend}, CUDA graph", our_epoch(True)))
    ours = timed[0][1]
    theirs = torch_epoch(torch, minicnn.build_model("hw3_cnn"), x, y, args.batch_size, device)

    rows = []
    for name, secs in (*timed, ("PyTorch " + device, theirs)):
        rows.append({"library": name, "images": n, "seconds": round(secs, 2), "img_s": round(n / secs, 1),
                     "full_epoch_s": round(full_n * secs / n, 1),
                     "measured": "full epoch" if n == full_n else f"projected from {n} images"})
    ratio = theirs / ours
    print(f"hw3_cnn, one FER-2013 epoch ({full_n} training images), batch {args.batch_size}, float32, "
          f"HW3 augmentation included; ratio (minicnn / PyTorch throughput) = {ratio:.3f}")
    print(markdown_table(rows, ["library", "images", "seconds", "img_s", "full_epoch_s", "measured"]))
    out = args.json or default_json_path(f"epoch_{args.backend}")
    write_json(out, {"benchmark": "epoch", "model": "hw3_cnn", "batch": args.batch_size, "dtype": "float32",
                     "full_epoch_images": full_n, "ratio": ratio, "environment": environment(torch), "rows": rows,
                     **({"graph_ratio": theirs / timed[1][1]} if args.cuda_graph else {})})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
