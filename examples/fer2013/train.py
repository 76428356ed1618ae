#!/usr/bin/env python
"""Train a zoo network on FER-2013, then report its PublicTest accuracy.

A thin wrapper: the command lives in the library, ``minicnn/cli/train.py``, and is also
``minicnn train`` (after ``pip install -e .``). ``--help`` lists every option.
"""
import sys

from minicnn.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
