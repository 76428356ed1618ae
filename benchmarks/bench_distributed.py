#!/usr/bin/env python
"""Data-parallel training throughput on this machine: minicnn on 1 process and on N MPI ranks,
PyTorch on 1 process and with DistributedDataParallel (gloo) on N ranks, in the same run.

One step = forward + softmax cross-entropy + backward (+ gradient allreduce) + Adam, on random
inputs (B, 1, 48, 48), float32, at the same *global* batch B for every configuration (each of N
ranks takes B / N images). The configurations run in turns, ``--rounds`` times, and each keeps
its best round (the least disturbed by whatever else the machine runs); img/s counts global images.

It also times the matrix products alone (every Conv2D's three GEMMs and every Dense's three,
with the shapes of the step) under each configuration's threading: their img/s is the
GEMM-bound limit, what minicnn would reach if everything else in the step were free.

    python benchmarks/bench_distributed.py                       # hw3_cnn, global batch 128, 2 ranks
    python benchmarks/bench_distributed.py --ranks 2 --batch 128 --rounds 3 --json out.json

Needs mpi4py with an MPI (``pip install -e '.[mpi]'``) and torch (``[dev]``). Rank traffic is loopback.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


def _batch(b, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, 1, 48, 48)).astype(np.float32), rng.integers(0, 7, b)


def _times(step, repeats, warmup, barrier=lambda: None):
    for _ in range(warmup):
        step()
    out = []
    for _ in range(repeats):
        barrier()
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


# -- workers (one process each) -------------------------------------------------------------------
def worker_minicnn(args):
    import minicnn  # noqa: PLC0415
    from minicnn.distributed import GradientAllreduce, broadcast_model, world  # noqa: PLC0415
    from minicnn.optim import Adam  # noqa: PLC0415

    minicnn.backend.use_heap_allocator()
    minicnn.seed(0)
    comm = world()
    threads = comm.limit_blas_threads() if comm.size > 1 else None
    model = minicnn.build_model(args.model)
    broadcast_model(model, comm)
    x, y = _batch(args.batch)
    lo, hi = (args.batch * comm.rank) // comm.size, (args.batch * (comm.rank + 1)) // comm.size
    x, y = x[lo:hi], y[lo:hi]
    loss_fn, opt, allreduce = minicnn.SoftmaxCrossEntropy(), Adam(model, lr=1e-3), GradientAllreduce()

    def step():
        loss_fn.forward(model.forward(x, training=True), y)
        model.backward(loss_fn.backward())
        allreduce(model, comm)
        opt.step()

    times = _times(step, args.repeats, args.warmup, comm.barrier)
    gemm = gemm_seconds(model, x, args.repeats)
    conv_dense = layer_seconds(model, x, args.repeats, ("Conv2D", "Dense"))
    if comm.rank == 0:
        Path(args.result).write_text(json.dumps({"times": times, "gemm_s": gemm, "conv_dense_s": conv_dense,
                                                 "ranks": comm.size, "blas_threads": threads}))


def layer_seconds(model, x, repeats, kinds):
    """Median seconds of the forward + backward of the step's layers of ``kinds`` alone (this process's shard).

    For Conv2D and Dense this is the whole layer as minicnn computes it (im2col, the GEMMs, col2im and the
    layout copies), with the step's shapes: what a step would take if every other layer, the loss, the
    allreduce and the optimiser were free.
    """
    rng = np.random.default_rng(1)
    chosen = []
    h = x
    for layer in model.layers:
        out = layer.forward(h, training=True)
        if type(layer).__name__ in kinds:
            chosen.append((layer, h, rng.standard_normal(out.shape).astype(out.dtype)))
        h = out

    def run():
        for layer, inp, dout in chosen:
            layer.forward(inp, training=True)
            layer.backward(dout)

    return float(np.median(_times(run, repeats, 2)))


def gemm_seconds(model, x, repeats):
    """Median seconds of the step's matrix products alone, with the step's shapes (this process's shard)."""
    products = []
    h = x
    for layer in model.layers:
        name = type(layer).__name__
        if name == "Conv2D":
            kh, kw = layer.kernel_size
            oh, ow = layer.output_shape(h.shape[2], h.shape[3])
            k, cols_n, f = layer.in_channels * kh * kw, len(x) * oh * ow, layer.out_channels
            products.append(((f, k), (k, cols_n)))  # forward  W @ cols
            products.append(((f, cols_n), (cols_n, k)))  # dW = g @ cols^T
            products.append(((k, f), (f, cols_n)))  # dcols = W^T @ g
        elif name == "Dense":
            n, i, o = len(x), layer.in_features, layer.out_features
            products += [((n, i), (i, o)), ((i, n), (n, o)), ((n, o), (o, i))]
        h = layer.forward(h, training=False)
    rng = np.random.default_rng(0)
    mats = [(rng.standard_normal(a).astype(np.float32), rng.standard_normal(b).astype(np.float32))
            for a, b in products]
    def run():
        for a, b in mats:
            a @ b

    times = _times(run, repeats, 2)
    return float(np.median(times))


def worker_torch(args):
    import torch  # noqa: PLC0415

    import minicnn  # noqa: PLC0415
    from common import torch_twin  # noqa: PLC0415

    ddp = args.world > 1
    if ddp:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        torch.distributed.init_process_group("gloo", rank=args.rank, world_size=args.world)
    minicnn.seed(0)
    net = torch_twin(minicnn.build_model(args.model), torch).train()
    if ddp:
        net = torch.nn.parallel.DistributedDataParallel(net)
    x, y = _batch(args.batch)
    lo, hi = (args.batch * args.rank) // args.world, (args.batch * (args.rank + 1)) // args.world
    tx, ty = torch.from_numpy(x[lo:hi]), torch.from_numpy(y[lo:hi])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(tx), ty).backward()
        opt.step()

    barrier = torch.distributed.barrier if ddp else (lambda: None)
    times = _times(step, args.repeats, args.warmup, barrier)
    if args.rank == 0:
        Path(args.result).write_text(json.dumps({"times": times, "ranks": args.world,
                                                 "threads": torch.get_num_threads(), "torch": torch.__version__}))
    if ddp:
        torch.distributed.destroy_process_group()


# -- the launcher ------------------------------------------------------------------------------------
def _mpiexec():
    from minicnn.distributed import find_mpiexec  # noqa: PLC0415

    found = find_mpiexec()
    if found is None:
        sys.exit("error: no mpiexec found: pip install -e '.[mpi]' (mpi4py and the MPICH wheel) or a system MPI")
    return found


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    from minicnn.distributed import launcher_free_environment  # noqa: PLC0415

    return launcher_free_environment(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def run_config(kind, ranks, args, tmp):
    result = Path(tmp) / f"{kind}_{ranks}.json"
    common = ["--model", args.model, "--batch", str(args.batch), "--repeats", str(args.repeats),
              "--warmup", str(args.warmup), "--result", str(result)]
    if kind == "minicnn":
        cmd = [sys.executable, str(HERE), "--worker", "minicnn", *common]
        if ranks > 1:
            cmd = [_mpiexec(), "-n", str(ranks), *cmd]
        procs = [subprocess.Popen(cmd, env=_env())]
    else:
        port = _free_port()
        procs = [subprocess.Popen([sys.executable, str(HERE), "--worker", "torch", *common, "--rank", str(r),
                                   "--world", str(ranks), "--port", str(port)], env=_env()) for r in range(ranks)]
    codes = [p.wait(timeout=900) for p in procs]
    if any(codes):
        sys.exit(f"error: the {kind} run on {ranks} rank(s) failed (exit codes {codes})")
    return json.loads(result.read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hw3_cnn")
    p.add_argument("--batch", type=int, default=128, help="global batch (split over the ranks)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the multi-process configurations")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="each configuration runs this many times, in turns")
    p.add_argument("--json", default=None, help="output JSON (default runs/benchmarks/distributed_<model>.json; the reference is benchmarks/results/)")
    p.add_argument("--worker", choices=["minicnn", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "minicnn":
        return worker_minicnn(args)
    if args.worker == "torch":
        return worker_torch(args)
    if args.batch < args.ranks or args.ranks < 2:
        sys.exit(f"error: --ranks must be >= 2 and --batch ({args.batch}) >= --ranks ({args.ranks})")

    import torch  # noqa: PLC0415

    import minicnn  # noqa: PLC0415
    from common import default_json_path, environment, markdown_table, write_json  # noqa: PLC0415

    configs = [("minicnn", 1), ("minicnn", args.ranks), ("torch", 1), ("torch", args.ranks)]
    best = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for kind, ranks in configs:
                res = run_config(kind, ranks, args, tmp)
                step = float(np.median(res["times"]))
                print(f"round {r + 1}/{args.rounds}: {kind} on {ranks} process(es): {args.batch / step:.1f} img/s",
                      flush=True)
                if (kind, ranks) not in best or step < best[(kind, ranks)]["step_s"]:
                    best[(kind, ranks)] = {"step_s": step, **res}
    torch_best = max(args.batch / best[("torch", n)]["step_s"] for n in (1, args.ranks))
    rows = []
    for (kind, ranks), res in best.items():
        img_s = args.batch / res["step_s"]
        label = {("minicnn", 1): "minicnn, 1 process", ("minicnn", args.ranks): f"minicnn, {ranks} MPI ranks",
                 ("torch", 1): "PyTorch CPU, 1 process",
                 ("torch", args.ranks): f"PyTorch DDP (gloo), {ranks} ranks"}[(kind, ranks)]
        threads = (res.get("blas_threads") or os.cpu_count()) if kind == "minicnn" else res.get("threads")
        row = {"configuration": label, "processes": ranks, "threads_per_process": threads,
               "img_s": round(img_s, 1), "step_ms": round(1e3 * res["step_s"], 1),
               "vs_best_torch": round(img_s / torch_best, 3)}
        if kind == "minicnn":
            # the ranks run their shards' products at the same time: B images per gemm_s
            row["gemm_bound_img_s"] = round(args.batch / res["gemm_s"], 1)
            row["share_of_gemm_bound"] = round(img_s / row["gemm_bound_img_s"], 3)
            # the same for the whole Conv2D and Dense layers (im2col, GEMMs, col2im, copies) alone
            row["conv_dense_bound_img_s"] = round(args.batch / res["conv_dense_s"], 1)
            row["conv_dense_bound_vs_best_torch"] = round(row["conv_dense_bound_img_s"] / torch_best, 3)
        rows.append(row)
    cols = ["configuration", "processes", "threads_per_process", "img_s", "step_ms", "vs_best_torch",
            "gemm_bound_img_s", "share_of_gemm_bound", "conv_dense_bound_img_s", "conv_dense_bound_vs_best_torch"]
    print()
    print(f"{args.model} training, global batch {args.batch}, float32, Adam; best of {args.rounds} rounds of "
          f"{args.repeats} steps (median). vs_best_torch = img/s / the faster PyTorch configuration "
          f"({torch_best:.1f} img/s); gemm_bound = img/s if only the matrix products took time; "
          f"conv_dense_bound = img/s if only the Conv2D and Dense layers (im2col, GEMMs, col2im, copies) took time")
    print(markdown_table(rows, cols))
    out = args.json or default_json_path(f"distributed_{args.model}")
    write_json(out, {"benchmark": "distributed", "model": args.model, "global_batch": args.batch,
                     "ranks": args.ranks, "rounds": args.rounds, "repeats": args.repeats,
                     "environment": environment(torch), "minicnn": minicnn.__version__, "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
