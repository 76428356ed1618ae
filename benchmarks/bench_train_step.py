#!/usr/bin/env python
"""Training-step throughput of a zoo model, minicnn vs PyTorch in the same run: ``minicnn bench``.

The benchmark lives in the library (``minicnn/cli/bench.py``) so that the ``minicnn`` command has it;
this script is the same command. ``--help`` lists every option.
"""
import sys

from minicnn.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
