"""Training-step throughput of a zoo model: minicnn (NumPy or CuPy) vs PyTorch, in the same run.

One step = forward + softmax cross-entropy + backward + Adam update, on random
inputs of shape (B, 1, 48, 48), float32. Prints a markdown table with img/s
and the minicnn / PyTorch ratio, and writes JSON with the environment.

    minicnn bench                                               # hw3_cnn, batch 128, CPU
    minicnn bench --models hw3_cnn hw3_dnn --batch-sizes 64 128 256
    minicnn bench --backend cupy                                # CuPy vs PyTorch CUDA
    minicnn bench --backend cupy --generic                      # + minicnn without its fused kernels
    minicnn bench --backend cupy --torch-compile                # + PyTorch under torch.compile
    minicnn bench --backend cupy --cuda-graph                   # + minicnn's step replayed as a CUDA graph
    minicnn bench --models ece662_resnet --shifted              # + every stride-1 conv by row shifts

Timing: ``--warmup`` untimed steps, then ``--repeats`` steps each timed alone,
synchronised with the device on both sides; the table gives medians. TF32 is
pinned on both sides (``--tf32``, default off: full float32, as NumPy computes)
and stated in the output. On a GPU each row also gives the peak device memory
of a few steps: what CuPy's pool reserved beside PyTorch's ``max_memory_reserved``;
on the CPU, minicnn's rows give the peak of what NumPy allocated over a few steps
(``tracemalloc``; PyTorch's CPU allocations are not traced, so it has no such column), and both
sides' minor page faults per step (pages the kernel had to map on first touch; README's "Freed
memory, reused" says why they cost time).

``python benchmarks/bench_train_step.py`` is the same command. PyTorch is the peer: install it
(CPU build: see README) to get the comparison.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import minicnn
from minicnn import kernels
from minicnn.graphs import GraphedStep
from minicnn.optim import Adam

from ..benchmarking import (default_json_path, environment, markdown_table, pool_peak_bytes, setup, summarize, time_call,
                            torch_peak_bytes, torch_twin, traced_peak_bytes, write_json)

MEMORY_STEPS = 3  # steps run (after the timing) to read the peak device memory


def minicnn_step(model, x, y, train=True, graph=False):
    """One minicnn training step (or evaluation forward pass) as a function of no arguments.

    ``graph``: the step through :class:`minicnn.graphs.GraphedStep` (two eager warm-up calls, then the
    capture, then replays); the function's ``graphed`` attribute is that object.
    """
    if not train:
        return lambda: model.forward_only(x)
    loss_fn, opt = minicnn.SoftmaxCrossEntropy(), Adam(model, lr=1e-3)

    def eager(xb, yb):
        loss = loss_fn.forward(model.forward(xb, training=True), yb)
        model.backward(loss_fn.backward())
        opt.step()
        return (loss,)

    if not graph:
        return lambda: eager(x, y)
    graphed = GraphedStep(eager, model, opt)

    def step():
        return graphed(x, y)

    step.graphed = graphed
    return step


def torch_step(torch, model, x, y, device, train=True, compile_backend=None):
    """The same step in PyTorch, on the twin of ``model``; under ``torch.compile`` when a backend is named."""
    net = torch_twin(model, torch).to(device)
    tx, ty = torch.from_numpy(minicnn.to_host(x)).to(device), torch.from_numpy(minicnn.to_host(y)).to(device)
    net.train(train)
    forward = torch.compile(net, backend=compile_backend) if compile_backend else net
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(forward(tx), ty).backward()
        opt.step()

    def infer():
        with torch.no_grad():
            forward(tx)

    return step if train else infer


def measure(run, repeats, warmup, sync):
    """``(summary, first_call_seconds)``: the first call timed alone (it compiles, where anything does).

    The summary also holds ``page_faults_per_call``: the process's minor page faults over the warm-up
    and timed calls (not the first), per call (None where the OS does not count them; host faults on a
    GPU too). A CPU step that reuses freed memory touches no new page; one whose arrays come fresh from
    the kernel faults once per 4 KB page of them, or once per 2 MB huge page where the kernel gives those.
    """
    t = time.perf_counter()
    run()
    if sync:
        sync()
    first = time.perf_counter() - t
    more_warmup = max(warmup - 1, 0)  # the first call was one of the warm-up calls
    faults = _minor_faults()
    summary = summarize(time_call(run, repeats, more_warmup, sync))
    calls = repeats + more_warmup
    summary["page_faults_per_call"] = None if faults is None else round((_minor_faults() - faults) / calls, 1)
    return summary, first


def _minor_faults():
    """Minor page faults of this process so far (the kernel mapping a page on first touch); None off Unix."""
    try:
        import resource  # noqa: PLC0415  (Unix only)
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _mib(n):
    return round(n / 2**20, 1)


def bench_row(torch, args, name, b, mode, train, fused, device, syncs, xp, graph=False, algorithm="auto"):
    """Time one (model, batch, mode) for minicnn and its PyTorch peer; read the peaks of memory.

    ``algorithm``: the convolutions' (:func:`minicnn.set_conv_algorithm`).
    """
    minicnn.seed(0)
    model = minicnn.build_model(name)
    minicnn.set_conv_algorithm(model, algorithm)
    rng = np.random.default_rng(0)
    x = minicnn.to_device(rng.standard_normal((b, 1, 48, 48)).astype(np.float32))
    y = minicnn.to_device(rng.integers(0, 7, b))
    peer = f"torch.compile ({args.torch_compile_backend})" if mode.endswith("(torch.compile)") else "torch eager"
    with kernels.use_fused(fused):
        ours_run = minicnn_step(model, x, y, train, graph=graph)
        # a graphed step is eager twice, then captured: the timed steps are replays
        o, _ = measure(ours_run, args.repeats, max(args.warmup, 3) if graph else args.warmup, syncs[0])
    row = {"model": name, "mode": mode, "batch": b, "peer": peer, "minicnn_img_s": round(b / o["median_s"], 1),
           "minicnn_ms": round(1e3 * o["median_s"], 1), "minicnn": o}
    if graph:
        g = ours_run.graphed
        row["graph"] = {"eager_steps": g.eager_steps, "captures": g.captures, "replays": g.replays}
    if device != "cuda":
        row["minicnn_faults_per_step"] = o["page_faults_per_call"]
        with kernels.use_fused(fused):
            row["minicnn_traced_peak_mib"] = _mib(traced_peak_bytes(lambda: [ours_run() for _ in range(MEMORY_STEPS)]))
    try:
        theirs_run = torch_step(torch, model, x, y, device, train,
                                args.torch_compile_backend if peer != "torch eager" else None)
        t, t_first = measure(theirs_run, args.repeats, args.warmup, syncs[1])
    except Exception as exc:  # noqa: BLE001  (torch.compile may not work on a machine: the row says why)
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        return row
    row.update({"torch_img_s": round(b / t["median_s"], 1), "ratio": round(t["median_s"] / o["median_s"], 3),
                "torch_ms": round(1e3 * t["median_s"], 1), "torch_first_call_s": round(t_first, 2), "torch": t})
    if device != "cuda":
        row["torch_faults_per_step"] = t["page_faults_per_call"]
    else:
        with kernels.use_fused(fused):
            # a graph's memory is its own pool's (minicnn.graphs), counted beside the default pool's
            ours_mem = pool_peak_bytes(xp, lambda: [ours_run() for _ in range(MEMORY_STEPS)],
                                       extra_pools=[ours_run.graphed.memory_pool] if graph else ())
        theirs_mem = torch_peak_bytes(torch, lambda: [theirs_run() for _ in range(MEMORY_STEPS)])
        row.update({"minicnn_peak_mib": _mib(ours_mem["reserved_bytes"]),
                    "torch_peak_mib": _mib(theirs_mem["reserved_bytes"]),
                    "memory_ratio": round(ours_mem["reserved_bytes"] / max(theirs_mem["reserved_bytes"], 1), 2),
                    "minicnn_memory": ours_mem, "torch_memory": theirs_mem})
    return row


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
    p.add_argument("--torch-compile", action="store_true",
                   help="also time PyTorch under torch.compile (a row says why where it does not work)")
    p.add_argument("--torch-compile-backend", default="inductor", help="torch.compile's backend (default inductor)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time minicnn's training step captured as a CUDA graph and replayed (--backend cupy; "
                        "the peer is PyTorch eager)")
    p.add_argument("--shifted", action="store_true",
                   help="also time minicnn with every stride-1 convolution by row shifts (algorithm 'shifted': "
                        "less memory kept for backward)")
    p.add_argument("--tf32", choices=["off", "on"], default="off",
                   help="TensorFloat-32 for float32 products and convolutions, pinned on both sides (default off)")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator settings alone")
    p.add_argument("--malloc-trim-threshold", type=int, default=None, metavar="BYTES",
                   help="give freed memory above this many bytes back to the kernel (default: never; "
                        "minicnn.backend.use_heap_allocator's trim_threshold)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--json", default=None, help="output JSON path (default runs/benchmarks/train_step_<backend>.json; the reference figures are benchmarks/results/*.json)")
    args = p.parse_args(argv)
    if args.cuda_graph and args.backend != "cupy":
        p.error("--cuda-graph needs --backend cupy")
    if args.malloc_trim_threshold is not None:
        if args.default_malloc:
            p.error("--malloc-trim-threshold sets minicnn's heap allocator, which --default-malloc leaves off")
        if not 0 <= args.malloc_trim_threshold < 2**31:
            p.error(f"--malloc-trim-threshold: expected bytes in [0, 2**31), got {args.malloc_trim_threshold}")

    import torch  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    xp, device, sync_ours, sync_torch = setup(args.backend, torch, heap_allocator=not args.default_malloc,
                                              tf32=args.tf32 == "on", trim_threshold=args.malloc_trim_threshold)
    precision = environment(torch)["precision"]
    rows = []
    for name in args.models:
        for b in args.batch_sizes:
            modes = [("train", True, True)] + ([("inference", False, True)] if args.inference else [])
            if args.shifted:
                modes += [("train (shifted convs)", True, True)]
            if args.cuda_graph:
                modes += [("train (CUDA graph)", True, True)]
            if args.generic:
                modes += [("train (generic)", True, False)] + (
                    [("inference (generic)", False, False)] if args.inference else [])
            if args.torch_compile:
                modes += [("train (torch.compile)", True, True)] + (
                    [("inference (torch.compile)", False, True)] if args.inference else [])
            for mode, train, fused in modes:
                row = bench_row(torch, args, name, b, mode, train, fused, device, (sync_ours, sync_torch), xp,
                                graph=mode == "train (CUDA graph)",
                                algorithm="shifted" if mode == "train (shifted convs)" else "auto")
                rows.append(row)
                print(f"{name} {mode} batch {b}: minicnn {row['minicnn_img_s']} img/s, "
                      + (f"{row['peer']} failed: {row['error']}" if "error" in row else
                         f"{row['peer']} {row['torch_img_s']} img/s, ratio {row['ratio']}"), flush=True)
    cols = ["model", "mode", "batch", "minicnn_img_s", "torch_img_s", "ratio", "minicnn_ms", "torch_ms"]
    if device == "cuda":
        cols += ["minicnn_peak_mib", "torch_peak_mib", "memory_ratio"]
    else:
        cols += ["minicnn_traced_peak_mib", "minicnn_faults_per_step", "torch_faults_per_step"]
    print()
    print(f"minicnn ({args.backend}) vs PyTorch ({device}), float32, TF32 {args.tf32}, median of {args.repeats} "
          f"steps after {args.warmup} warm-up; ratio = minicnn throughput / PyTorch throughput")
    print(f"precision in force: {precision}")
    print(markdown_table(rows, cols))
    out = args.json or default_json_path(f"train_step_{args.backend}")
    write_json(out, {"benchmark": "train_step", "environment": environment(torch), "dtype": "float32",
                     "precision": precision, "heap_allocator": not args.default_malloc,
                     # bytes of free heap top given back to the kernel; "never" (minicnn's), or glibc's default
                     "malloc_trim_threshold": ("glibc default" if args.default_malloc else
                                               "never" if args.malloc_trim_threshold is None
                                               else args.malloc_trim_threshold),
                     "warmup": args.warmup, "repeats": args.repeats,
                     "optimizer": "Adam(1e-3)", "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
