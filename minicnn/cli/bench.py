"""Training-step throughput of a zoo model: minicnn (NumPy or CuPy) vs PyTorch, in the same run.

One step = forward + softmax cross-entropy + backward + Adam update, on random
inputs of shape (B, 1, 48, 48), float32. Prints a markdown table with img/s
and the minicnn / PyTorch ratio, and writes JSON with the environment.

    minicnn bench                                               # hw3_cnn, batch 128, CPU
    minicnn bench --models hw3_cnn hw3_dnn --batch-sizes 64 128 256
    minicnn bench --backend cupy                                # CuPy vs PyTorch CUDA
    minicnn bench --backend cupy --generic                      # + minicnn without its fused kernels

``python benchmarks/bench_train_step.py`` is the same command. PyTorch is the peer: install it
(CPU build: see README) to get the comparison.
"""
from __future__ import annotations

import argparse

import numpy as np

import minicnn
from minicnn import kernels
from minicnn.optim import Adam

from ..benchmarking import (default_json_path, environment, markdown_table, setup, summarize, time_call, torch_twin,
                            write_json)


def bench_minicnn(model, x, y, repeats, warmup, sync):
    loss_fn, opt = minicnn.SoftmaxCrossEntropy(), Adam(model, lr=1e-3)

    def step():
        loss_fn.forward(model.forward(x, training=True), y)
        model.backward(loss_fn.backward())
        opt.step()

    return time_call(step, repeats, warmup, sync)


def bench_minicnn_inference(model, x, repeats, warmup, sync):
    return time_call(lambda: model.forward_only(x), repeats, warmup, sync)


def bench_torch(torch, model, x, y, repeats, warmup, device, train=True):
    net = torch_twin(model, torch).to(device)
    tx, ty = torch.from_numpy(minicnn.to_host(x)).to(device), torch.from_numpy(minicnn.to_host(y)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sync = torch.cuda.synchronize if device == "cuda" else None

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(tx), ty).backward()
        opt.step()

    def infer():
        with torch.no_grad():
            net(tx)

    if train:
        net.train()
        return time_call(step, repeats, warmup, sync)
    net.eval()
    return time_call(infer, repeats, warmup, sync)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--models", nargs="+", default=["hw3_cnn"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--inference", action="store_true", help="also time evaluation-mode forward passes")
    p.add_argument("--generic", action="store_true",
                   help="also time minicnn with its fused CuPy kernels off (minicnn.kernels.use_fused(False))")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator settings alone")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--json", default=None, help="output JSON path (default runs/benchmarks/train_step_<backend>.json; the reference figures are benchmarks/results/*.json)")
    args = p.parse_args(argv)

    import torch  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    _, device, sync, _ = setup(args.backend, torch, heap_allocator=not args.default_malloc)
    rows = []
    for name in args.models:
        for b in args.batch_sizes:
            model = minicnn.build_model(name)
            rng = np.random.default_rng(0)
            x = minicnn.to_device(rng.standard_normal((b, 1, 48, 48)).astype(np.float32))
            y = minicnn.to_device(rng.integers(0, 7, b))
            modes = [("train", True, True)] + ([("inference", False, True)] if args.inference else [])
            if args.generic:
                modes += [("train (generic)", True, False)] + (
                    [("inference (generic)", False, False)] if args.inference else [])
            for mode, train, fused in modes:
                with kernels.use_fused(fused):
                    ours = (bench_minicnn(model, x, y, args.repeats, args.warmup, sync) if train
                            else bench_minicnn_inference(model, x, args.repeats, args.warmup, sync))
                theirs = bench_torch(torch, model, x, y, args.repeats, args.warmup, device, train)
                o, t = summarize(ours), summarize(theirs)
                row = {"model": name, "mode": mode, "batch": b,
                       "minicnn_img_s": round(b / o["median_s"], 1), "torch_img_s": round(b / t["median_s"], 1),
                       "ratio": round(t["median_s"] / o["median_s"], 3),
                       "minicnn_ms": round(1e3 * o["median_s"], 1), "torch_ms": round(1e3 * t["median_s"], 1),
                       "minicnn": o, "torch": t}
                rows.append(row)
                print(f"{name} {mode} batch {b}: minicnn {row['minicnn_img_s']} img/s, "
                      f"torch {row['torch_img_s']} img/s, ratio {row['ratio']}", flush=True)
    cols = ["model", "mode", "batch", "minicnn_img_s", "torch_img_s", "ratio", "minicnn_ms", "torch_ms"]
    print()
    print(f"minicnn ({args.backend}) vs PyTorch ({device}), float32, median of {args.repeats} steps; "
          "ratio = minicnn throughput / PyTorch throughput")
    print(markdown_table(rows, cols))
    out = args.json or default_json_path(f"train_step_{args.backend}")
    write_json(out, {"benchmark": "train_step", "environment": environment(torch), "dtype": "float32",
                     "heap_allocator": not args.default_malloc,
                     "optimizer": "Adam(1e-3)", "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
