#!/usr/bin/env python
"""Recalibrate a trained network's BatchNorm statistics on its clean training images (precise BN).

A thin wrapper: the command lives in the library, ``minicnn/cli/precise_bn.py``, and is also
``minicnn precise-bn`` (after ``pip install -e .``). ``--help`` lists every option.
"""
import sys

from minicnn.cli.precise_bn import main

if __name__ == "__main__":
    sys.exit(main())
