"""``minicnn average``: one checkpoint whose weights are the average of several ("stochastic weight averaging").

    minicnn average runs/phase1/best.npz runs/phase2/best.npz --out runs/swa.npz
    minicnn average a.npz b.npz c.npz --weights 1 1 2 --out runs/swa.npz        # a weighted average
    minicnn precise-bn --checkpoint runs/swa.npz --out runs/swa_pbn.npz          # then: its BatchNorm statistics
    minicnn evaluate --checkpoint runs/swa_pbn.npz --split val                   # and choose on val

Checkpoints along one run, or the ends of ``--init-from`` phases that each
started from the one before, lie in one basin of the loss; the average of their
weights (Izmailov et al., 2018, "Averaging Weights Leads to Wider Optima and
Better Generalization") often generalises better than each of them. Every
weight is averaged (``w = sum_i a_i w_i``, ``a_i`` the normalised --weights,
equal by default); so are the BatchNorm statistics, but those of the averaged
network differ, so recalibrate them with ``minicnn precise-bn`` (which prints
the validation accuracy before and after) and compare the result with the
sources on the validation split, never on test.

The checkpoints must be of one network trained on one train/validation split
with one normalisation (train.py's checkpoints record all three); anything else
is refused, naming the file and what differs. The written file has no optimiser
state (it cannot resume training; it can start a new phase with ``--init-from``),
keeps the first checkpoint's arguments and history, drops what described only
that checkpoint's weights (a recorded TTA shift, a BatchNorm recalibration), and
records the sources under ``weight_average``. It is written atomically.
Exit codes: 0 written, 2 a bad flag, an unusable or mismatched checkpoint, or an unwritable --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minicnn.checkpoint import CheckpointError, save_npz
from minicnn.training import average_checkpoints
from .train import SPLIT_OPTIONS  # train.py's arguments that decide its train/validation split


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="two or more checkpoints of the same network and split (train.py's, or exported)")
    p.add_argument("--out", required=True, help="the averaged checkpoint to write (not one of the sources)")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="one positive weight per checkpoint, normalised to sum to 1 (default: equal)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    if len(args.checkpoints) < 2:
        p.error(f"give at least two checkpoints to average, got {len(args.checkpoints)}")
    if args.weights is not None and len(args.weights) != len(args.checkpoints):
        p.error(f"--weights gives {len(args.weights)} weights for {len(args.checkpoints)} checkpoints")
    if args.weights is not None and not all(w > 0 for w in args.weights):  # also refuses nan
        p.error(f"--weights must be positive, got {args.weights}")
    out = Path(args.out).resolve()
    if any(Path(c).resolve() == out for c in args.checkpoints):
        p.error(f"--out {args.out} is one of the checkpoints: the sources are kept as they are")
    if out.exists() and not args.overwrite:
        p.error(f"--out {args.out} exists: give --overwrite to replace it, or another file name")
    return args


def same_split_arguments(path, meta, first_path, first_meta):
    """CheckpointError unless ``path`` was trained with the split arguments of ``first_path``."""
    first, args = first_meta.get("args") or {}, meta.get("args") or {}
    changed = [f"--{k.replace('_', '-')} {args[k]!r} here, {first[k]!r} there"
               for k in SPLIT_OPTIONS if k in args and k in first and args[k] != first[k]]
    if changed:
        raise CheckpointError(f"{path}: was trained on another train/validation split than {first_path} "
                              f"({'; '.join(changed)}): their average would have seen validation images")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        arrays, meta = average_checkpoints(args.checkpoints, args.weights, check=same_split_arguments)
        out = save_npz(args.out, arrays, meta)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable folder, a full disk: nothing half-written is left (save_npz is atomic)
        print(f"error: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), "model": (meta.get("model") or {}).get("name"),
                      **meta["weight_average"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
