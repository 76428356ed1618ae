"""``minicnn export``: a training checkpoint as a file for inference (no optimiser state; float16 or int8 on request).

    minicnn export runs/fer2013/best.npz model.npz                    # float32: a third of the checkpoint
    minicnn export runs/fer2013/best.npz model.npz --dtype float16    # a sixth: the shipped weights' format
    minicnn export runs/fer2013/best.npz model.npz --dtype int8       # a twelfth
    minicnn evaluate --checkpoint model.npz --tta                     # evaluate / predict take it as is

A training checkpoint holds the weights, the BatchNorm statistics and the optimiser's state
(Adam keeps two arrays per weight), so that training can resume. For inference only the first
two are needed: the exported file keeps them, the model's name and configuration, the classes,
the normalisation, the history and any recorded TTA shift (see :func:`minicnn.export_for_inference`).
``--dtype float16`` stores weights and statistics in half precision; they are cast back to
float32 when loaded, so the network computes in float32 with weights rounded to 11
significant bits (the shipped ``hw3_cnn`` gives the same PublicTest accuracy either way).
``--dtype int8`` stores each weight matrix and kernel as int8 with one float32 scale per
output unit (a dense layer's column, a convolution's output channel) and the rest (biases,
BatchNorm) as float32; loading multiplies them back, so the network computes in float32 with
each weight within half a step (1/254 of its unit's largest weight) of the trained one.
Measure the exported file with ``minicnn evaluate`` before you use it instead of the source.
Exit codes: 0 written, 2 an unusable checkpoint or destination.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from minicnn.checkpoint import CheckpointError, dequantize_int8, load_npz, save_npz
from minicnn.training import inference_arrays


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint written by train.py (best.npz, last.npz) or an exported file")
    p.add_argument("out", help="the file to write (.npz), not the checkpoint itself")
    p.add_argument("--dtype", choices=["float32", "float16", "int8"], default="float32",
                   help="how weights and BatchNorm statistics are stored (default float32; int8: the weight "
                        "matrices and kernels, with a float32 scale per output unit)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        p.error(f"out must differ from the checkpoint ({args.out}): the source is kept as it is")
    if Path(args.out).exists() and not args.overwrite:
        p.error(f"{args.out} exists: give --overwrite to replace it, or another file name")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        source, source_meta = load_npz(args.checkpoint)
        exported, meta = inference_arrays(source, source_meta, args.dtype, source=args.checkpoint)
        out = save_npz(args.out, exported, meta)  # = export_for_inference, reading the checkpoint once
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable folder, a full disk: save_npz is atomic, nothing half-written stays
        print(f"error: {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    loaded = dequantize_int8(exported, source=args.out)  # what loading the file gives
    source = dequantize_int8(source, source=args.checkpoint)
    weights = [k for k in loaded if k.startswith(("param/", "buffer/")) and loaded[k].dtype.kind == "f"]
    # Rounding error of each array relative to its largest value (float16: at most 2**-11, about 4.9e-4;
    # int8: at most 1/254, about 3.9e-3, of the largest weight of each output unit).
    rounding = max((float(np.max(np.abs(loaded[k].astype(np.float64) - source[k])) / np.max(np.abs(source[k])))
                    for k in weights if loaded[k].size and np.any(source[k])), default=0.0)
    model = meta.get("model") or {}
    print(json.dumps({
        "out": str(out), "model": model.get("name"), "dtype": args.dtype,
        "bytes": {"checkpoint": Path(args.checkpoint).stat().st_size, "exported": Path(out).stat().st_size},
        "optimiser_arrays_dropped": sum(k.startswith("optim/") for k in source),
        "rounding_error_vs_array_max": rounding,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
