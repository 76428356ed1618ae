#!/usr/bin/env python
"""Forward + backward time of every layer of hw3_cnn at its real input shape: minicnn vs PyTorch.

Each layer is timed alone on a random input of the shape it sees inside the
network (batch 128 by default), forward in training mode then backward with a
random upstream gradient. Prints a markdown table (milliseconds and the ratio
PyTorch time / minicnn time, so > 1 means minicnn is faster) and writes JSON.

    python benchmarks/bench_layers.py                    # NumPy vs PyTorch CPU
    python benchmarks/bench_layers.py --backend cupy     # CuPy vs PyTorch CUDA
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import minicnn  # noqa: E402
from common import default_json_path, environment, markdown_table, setup, summarize, time_call, torch_twin, write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--model", default="hw3_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--tf32", choices=["off", "on"], default="off",
                   help="TensorFloat-32 for float32 products and convolutions, pinned on both sides")
    args = p.parse_args(argv)

    import torch  # noqa: PLC0415

    _, device, sync_ours, sync_torch = setup(args.backend, torch, tf32=args.tf32 == "on")
    model = minicnn.build_model(args.model)
    twin = torch_twin(model, torch).to(device).train()
    rng = np.random.default_rng(0)
    x = minicnn.to_device(rng.standard_normal((args.batch_size,) + model.input_shape).astype(np.float32))
    rows = []
    for i, (layer, tlayer) in enumerate(zip(model.layers, twin)):
        out = layer.forward(x, training=True)
        dout = minicnn.to_device(rng.standard_normal(out.shape).astype(np.float32))

        def ours(layer=layer, x=x, dout=dout):
            layer.forward(x, training=True)
            layer.backward(dout)

        tx = torch.from_numpy(minicnn.to_host(x)).to(device).requires_grad_(True)
        tdout = torch.from_numpy(minicnn.to_host(dout)).to(device)

        def theirs(tlayer=tlayer, tx=tx, tdout=tdout):
            tx.grad = None
            tlayer(tx).backward(tdout)

        o = summarize(time_call(ours, args.repeats, args.warmup, sync_ours))
        t = summarize(time_call(theirs, args.repeats, args.warmup, sync_torch))
        rows.append({"index": i, "layer": repr(layer), "input": "x".join(map(str, x.shape)),
                     "minicnn_ms": round(1e3 * o["median_s"], 2), "torch_ms": round(1e3 * t["median_s"], 2),
                     "ratio": round(t["median_s"] / o["median_s"], 3), "minicnn": o, "torch": t})
        print(f"{i:2d} {rows[-1]['layer']:<58} {rows[-1]['minicnn_ms']:8.2f} ms  torch {rows[-1]['torch_ms']:8.2f} ms",
              flush=True)
        x = out
    total_o = sum(r["minicnn_ms"] for r in rows)
    total_t = sum(r["torch_ms"] for r in rows)
    rows.append({"index": "", "layer": "**sum**", "input": "", "minicnn_ms": round(total_o, 1),
                 "torch_ms": round(total_t, 1), "ratio": round(total_t / total_o, 3)})
    print()
    print(f"{args.model}, batch {args.batch_size}, float32, forward + backward per layer, median of {args.repeats}; "
          f"minicnn {args.backend} vs PyTorch {device}; ratio = PyTorch time / minicnn time")
    print(markdown_table(rows, ["index", "layer", "input", "minicnn_ms", "torch_ms", "ratio"]))
    out_path = args.json or default_json_path(f"layers_{args.backend}")
    write_json(out_path, {"benchmark": "layers", "model": args.model, "batch": args.batch_size, "dtype": "float32",
                          "environment": environment(torch), "rows": rows})
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
