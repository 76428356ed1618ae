#!/usr/bin/env python
"""Evaluate a FER-2013 checkpoint (default: the shipped hw3_cnn) on PublicTest, PrivateTest or the run's own splits.

A thin wrapper: the command lives in the library, ``minicnn/cli/evaluate.py``, and is also
``minicnn evaluate`` (after ``pip install -e .``). ``--help`` lists every option.
"""
import sys

from minicnn.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
