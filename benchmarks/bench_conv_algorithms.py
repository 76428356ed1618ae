#!/usr/bin/env python
"""How fast can a NumPy convolution be? minicnn's two algorithms, im2col + GEMM and row shifts + 3 GEMMs,
against a NumPy Winograd F(2x2, 3x3) and PyTorch's CPU convolution (oneDNN), in the same run, on
hw3_cnn's four 3x3 convolutions (``--shapes zoo``: the 3x3 convolutions of the deeper zoo networks too).

For each shape: the forward pass by im2col (im2col + one GEMM + the NCHW copy, as
``minicnn.Conv2D(..., algorithm="im2col").forward``, the default) and by row shifts
(``algorithm="shifted"``: ``shifted_rows`` + three GEMMs + the NCHW copy), the forward and backward pass of
the layer both ways, what each keeps for backward (MB), the time of im2col's matrix products alone (its
three GEMMs, the GEMM-bound limit of im2col), the input gradient both ways (``col2im(W_mat^T @ G)``
against ``conv_input_grad``, the convolution of dout with the turned kernel) and which of the two
``Conv2D.backward`` takes, a Winograd forward written with NumPy array operations
(``winograd_conv3x3`` below: 2.25x fewer multiplications, but its input and output transforms are
sixteen strided passes each), and PyTorch's forward and forward + backward on the same tensors. One
thread by default: a rank of ``bench_distributed.py``'s 2-rank configuration. Every result is first
checked against ``minicnn.Conv2D`` (the timings are of code that computes the right thing).

    python benchmarks/bench_conv_algorithms.py                  # batch 64, 1 thread: table + JSON
    python benchmarks/bench_conv_algorithms.py --batch 128 --threads 2 --json out.json
    python benchmarks/bench_conv_algorithms.py --shapes zoo --batch 100 --threads 2   # + ResNet / VGG shapes

The question it answers (README, "Several processes"): whether the convolutions alone leave room
for minicnn's whole step to match PyTorch's on this CPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

# hw3_cnn's convolutions: (C_in, C_out, H = W), padding 1, stride 1
HW3_CONVS = [(1, 32, 48), (32, 64, 24), (64, 128, 12), (128, 256, 6)]
# the other 3x3, stride-1 convolutions of the zoo: ece662_resnet (64->64 at 48, 128->128 at 24),
# vgg_fer / vgg_fer_slim (1->64, 64->64, 64->128, 128->128, 128->256, 256->256 at 48, 24, 12, 6)
# and dlcv_cnn (128->512 at 12, 512->512 at 6)
ZOO_CONVS = HW3_CONVS + [(1, 64, 48), (64, 64, 48), (64, 128, 24), (128, 128, 24), (128, 256, 12),
                         (256, 256, 12), (256, 256, 6), (128, 512, 12), (512, 512, 6)]

# Winograd F(2x2, 3x3) (Lavin & Gray 2016): Y = A^T [ (G g G^T) * (B^T d B) ] A on 4x4 input tiles
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])


def _bt(r, out):
    """B^T applied along the axis of the four slabs ``r`` (rows 0-3 of each tile), written to ``out``."""
    np.subtract(r[0], r[2], out=out[0])
    np.add(r[1], r[2], out=out[1])
    np.subtract(r[2], r[1], out=out[2])
    np.subtract(r[1], r[3], out=out[3])


def _at(m, out):
    """A^T applied along the axis of the four slabs ``m``, written to the two slabs ``out``."""
    np.add(m[0], m[1], out=out[0])
    out[0] += m[2]
    np.subtract(m[1], m[2], out=out[1])
    out[1] -= m[3]


def winograd_conv3x3(x, w):
    """3x3 cross-correlation, stride 1, padding 1, by Winograd F(2x2, 3x3), in NumPy array operations.

    Shapes: x (N, C, H, W) with H and W even, w (F, C, 3, 3) -> out (N, F, H, W).
    Tiles of 4x4 input pixels (stride 2) give 2x2 outputs: 16 batched GEMMs (F, C) @ (C, N*H*W/4)
    instead of one (F, 9C) @ (9C, N*H*W), i.e. 4 instead of 9 multiplications per output and input channel.
    """
    n, c, h, wd = x.shape
    f = w.shape[0]
    th, tw = h // 2, wd // 2
    u = np.einsum("au,fcuv,bv->abfc", _G, w, _G).astype(x.dtype).reshape(16, 1, f, c)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    rows = np.empty((4, n, c, th, wd + 2), x.dtype)
    _bt([xp[:, :, k:k + 2 * th:2] for k in range(4)], rows)
    v = np.empty((4, 4, n, c, th, tw), x.dtype)
    for i in range(4):
        _bt([rows[i][..., k:k + 2 * tw:2] for k in range(4)], v[i])
    m = np.matmul(u, v.reshape(16, n, c, th * tw)).reshape(4, 4, n, f, th, tw)
    half = np.empty((2, 4, n, f, th, tw), x.dtype)
    _at(m, half)
    out = np.empty((n, f, th, 2, tw, 2), x.dtype)
    for p in range(2):
        _at(half[p], [out[:, :, :, p, :, 0], out[:, :, :, p, :, 1]])
    return out.reshape(n, f, h, wd)


def _gemms(layer, x, dout):
    """The layer's three matrix products, with the shapes its backward uses, as a callable."""
    from minicnn.layers.conv import im2col  # noqa: PLC0415

    c, f = layer.in_channels, layer.out_channels
    cols = im2col(x, 3, 3, 1, 1)
    wm = layer.params["W"].reshape(f, -1)
    g = np.ones((f, cols.shape[1]), x.dtype)
    if layer._dx_by_convolution():  # dx = W_rot (C, F*9) @ im2col(dout) (F*9, N*H*W)
        dx_operands = (np.ones((c, 9 * f), x.dtype), im2col(dout, 3, 3, 1, 1))
    else:  # dcols = W_mat^T (C*9, F) @ G (F, N*H*W), then col2im
        dx_operands = (wm.T, g)

    def run():
        wm @ cols
        g @ cols.T
        dx_operands[0] @ dx_operands[1]

    return run


def _input_gradients(layer, x, dout):
    """The input gradient by col2im and by the convolution with the turned kernel, as two callables."""
    from minicnn.layers.conv import col2im_input_grad, conv_input_grad  # noqa: PLC0415

    W = layer.params["W"]

    def by_col2im():  # with the layer's rearrangement of dout, as Conv2D.backward
        return col2im_input_grad(dout.transpose(1, 0, 2, 3).reshape(W.shape[0], -1), W, x.shape, 1, 1)

    def by_convolution():
        return conv_input_grad(dout, W, 1)

    return by_col2im, by_convolution


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shapes", choices=["hw3", "zoo"], default="hw3",
                   help="hw3_cnn's four convolutions, or every 3x3 stride-1 convolution of the zoo")
    p.add_argument("--threads", type=int, default=1, help="BLAS / PyTorch threads")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="output JSON (default runs/benchmarks/conv_algorithms.json)")
    args = p.parse_args(argv)

    import torch  # noqa: PLC0415
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    import minicnn  # noqa: PLC0415
    from common import default_json_path, environment, markdown_table, time_call, write_json  # noqa: PLC0415

    minicnn.backend.use_heap_allocator()
    torch.set_num_threads(args.threads)
    best = lambda fn: 1e3 * min(time_call(fn, args.repeats, args.warmup))  # noqa: E731  (ms, least disturbed)
    rows = []
    with threadpool_limits(args.threads):
        for c, f, h in HW3_CONVS if args.shapes == "hw3" else ZOO_CONVS:
            minicnn.seed(0)
            layer = minicnn.Conv2D(c, f, 3, padding=1, bias=False, algorithm="im2col")
            shifted = minicnn.Conv2D(c, f, 3, padding=1, bias=False, algorithm="shifted")
            shifted.params["W"][...] = layer.params["W"]
            rng = np.random.default_rng(0)
            x = rng.standard_normal((args.batch, c, h, h)).astype(np.float32)
            dout = rng.standard_normal((args.batch, f, h, h)).astype(np.float32)
            ours = layer.forward(x)
            wino = winograd_conv3x3(x, layer.params["W"])
            tconv = torch.nn.Conv2d(c, f, 3, padding=1, bias=False)
            with torch.no_grad():
                tconv.weight.copy_(torch.from_numpy(layer.params["W"]))
            tx = torch.from_numpy(x).requires_grad_(True)  # both compute dx, as for an inner layer
            theirs = tconv(tx).detach().numpy()
            scale = float(np.abs(ours).max())
            for name, other in (("winograd", wino), ("torch", theirs), ("shifted", shifted.forward(x))):
                err = float(np.abs(other - ours).max()) / scale
                if err > 1e-4:
                    sys.exit(f"error: {name} convolution differs from minicnn.Conv2D by {err:.2e} (relative) "
                             f"for shape {(c, f, h)}: refusing to time it")
            by_col2im, by_convolution = _input_gradients(layer, x, dout)
            dx_err = float(np.abs(by_col2im() - by_convolution()).max()) / float(np.abs(by_col2im()).max())
            if dx_err > 1e-4:
                sys.exit(f"error: the two input gradients differ by {dx_err:.2e} (relative) for shape {(c, f, h)}")
            tdout = torch.from_numpy(dout)

            kept_mb, dx_ref = {}, by_convolution()
            for name, conv in (("im2col", layer), ("shifted", shifted)):
                conv.forward(x)
                kept_mb[name] = round(conv.cache[2].nbytes / 2**20, 1)
                if float(np.abs(conv.backward(dout) - dx_ref).max()) > 1e-4 * float(np.abs(dx_ref).max()):
                    sys.exit(f"error: the {name} layer's input gradient is wrong for shape {(c, f, h)}")

            def ours_fwd_bwd():
                layer.forward(x)
                layer.backward(dout)

            def shifted_fwd_bwd():
                shifted.forward(x)
                shifted.backward(dout)

            def torch_fwd_bwd():
                tconv.weight.grad = None
                tconv(tx).backward(tdout)

            with torch.no_grad():
                torch_fwd = best(lambda: tconv(tx))
            row = {"shape": f"{c}->{f}, {h}x{h}", "im2col_fwd_ms": round(best(lambda: layer.forward(x)), 2),
                   "shifted_fwd_ms": round(best(lambda: shifted.forward(x)), 2),
                   "winograd_fwd_ms": round(best(lambda: winograd_conv3x3(x, layer.params["W"])), 2),
                   "torch_fwd_ms": round(torch_fwd, 2),
                   "im2col_fwd_bwd_ms": round(best(ours_fwd_bwd), 2),
                   "shifted_fwd_bwd_ms": round(best(shifted_fwd_bwd), 2),
                   "gemms_only_ms": round(best(_gemms(layer, x, dout)), 2),
                   "torch_fwd_bwd_ms": round(best(torch_fwd_bwd), 2),
                   "dx_col2im_ms": round(best(by_col2im), 2), "dx_convolution_ms": round(best(by_convolution), 2),
                   "dx_path": "convolution" if layer._dx_by_convolution() else "col2im",
                   "im2col_kept_mb": kept_mb["im2col"], "shifted_kept_mb": kept_mb["shifted"]}
            row["im2col_vs_torch_fwd_bwd"] = round(row["torch_fwd_bwd_ms"] / row["im2col_fwd_bwd_ms"], 3)
            row["shifted_vs_torch_fwd_bwd"] = round(row["torch_fwd_bwd_ms"] / row["shifted_fwd_bwd_ms"], 3)
            row["shifted_speedup"] = round(row["im2col_fwd_bwd_ms"] / row["shifted_fwd_bwd_ms"], 3)
            rows.append(row)
            print(f"{row['shape']}: done", flush=True)
    total = {k: round(sum(r[k] for r in rows), 1) for k in rows[0] if k.endswith(("_ms", "_mb"))}
    rows.append({"shape": f"all {len(rows)}", **total, "dx_path": "",
                 "im2col_vs_torch_fwd_bwd": round(total["torch_fwd_bwd_ms"] / total["im2col_fwd_bwd_ms"], 3),
                 "shifted_vs_torch_fwd_bwd": round(total["torch_fwd_bwd_ms"] / total["shifted_fwd_bwd_ms"], 3),
                 "shifted_speedup": round(total["im2col_fwd_bwd_ms"] / total["shifted_fwd_bwd_ms"], 3)})
    cols = ["shape", "im2col_fwd_ms", "shifted_fwd_ms", "winograd_fwd_ms", "torch_fwd_ms", "im2col_fwd_bwd_ms",
            "shifted_fwd_bwd_ms", "gemms_only_ms", "torch_fwd_bwd_ms", "im2col_vs_torch_fwd_bwd",
            "shifted_vs_torch_fwd_bwd", "shifted_speedup", "im2col_kept_mb", "shifted_kept_mb",
            "dx_col2im_ms", "dx_convolution_ms", "dx_path"]
    which = "hw3_cnn's" if args.shapes == "hw3" else "The zoo's"
    print(f"\n{which} 3x3 convolutions, batch {args.batch}, float32, {args.threads} thread(s), best of "
          f"{args.repeats} (ms); X_vs_torch = PyTorch time / minicnn time (forward + backward, both with the "
          "input gradient); shifted_speedup = im2col time / shifted time; kept_mb: what forward keeps for backward")
    print(markdown_table(rows, cols))
    out = args.json or default_json_path("conv_algorithms")
    write_json(out, {"benchmark": "conv_algorithms", "shapes": args.shapes, "batch": args.batch, "threads": args.threads,
                     "repeats": args.repeats, "environment": environment(torch), "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
