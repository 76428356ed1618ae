"""The ``minicnn`` command: the FER-2013 application and the benchmark, from any install.

    minicnn train --data ../shared/data/fer2013     # train hw3_cnn with the HW3 recipe (= examples/fer2013/train.py)
    minicnn evaluate --tta                          # the shipped weights on PublicTest, 10-crop TTA
    minicnn predict face.jpg photos/                # image files and folders, any size or colour
    minicnn precise-bn --checkpoint runs/fer2013/best.npz --out runs/fer2013/best_pbn.npz
    minicnn bench                                   # a training step, minicnn vs PyTorch (if installed)
    minicnn average runs/a/best.npz runs/b/best.npz --out runs/swa.npz   # weight averaging; then precise-bn
    minicnn export runs/fer2013/best.npz model.npz --dtype float16   # for inference: an Adam checkpoint shrinks 6x
    minicnn cache                                   # where decoded FER-2013 arrays are cached; --clear
    python -m minicnn ...                           # the same

Each subcommand is a module of this package with a ``main(argv)`` returning the exit code
(0 done; 1 training diverged, or predict skipped some images; 2 a bad flag, file, checkpoint or
backend; 130 interrupted);
``examples/fer2013/*.py`` and ``benchmarks/bench_train_step.py`` are thin wrappers of them.
"""
from __future__ import annotations

import importlib
import sys

__all__ = ["main", "COMMANDS"]

#: subcommand -> (module, one-line description)
COMMANDS = {
    "train": ("minicnn.cli.train", "train a zoo network on FER-2013 and report its PublicTest accuracy"),
    "evaluate": ("minicnn.cli.evaluate", "evaluate a checkpoint (default: the shipped hw3_cnn) on a split"),
    "predict": ("minicnn.cli.predict", "predict the expression of face images or folders of them"),
    "precise-bn": ("minicnn.cli.precise_bn", "recalibrate BatchNorm statistics on clean training images"),
    "bench": ("minicnn.cli.bench", "training-step throughput, minicnn vs PyTorch in the same run"),
    "average": ("minicnn.cli.average", "average the weights of checkpoints of one network (stochastic weight averaging)"),
    "export": ("minicnn.cli.export", "a checkpoint as a file for inference: no optimiser state, float16 or int8 on request"),
    "cache": ("minicnn.cli.cache", "show or clear the cache of decoded FER-2013 arrays"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: minicnn COMMAND [options]   (minicnn COMMAND --help for the options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run ``minicnn COMMAND ...``; returns the command's exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from minicnn import __version__  # noqa: PLC0415

        print(f"minicnn {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"error: minicnn: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    saved = sys.argv[0]
    sys.argv[0] = f"minicnn {name}"  # argparse names the program after argv[0]: "usage: minicnn train ..."
    try:
        return module.main(argv[1:])
    finally:
        sys.argv[0] = saved
