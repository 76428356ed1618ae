#!/usr/bin/env python
"""Predict the facial expression of face images or folders of them.

A thin wrapper: the command lives in the library, ``minicnn/cli/predict.py``, and is also
``minicnn predict`` (after ``pip install -e .``). ``--help`` lists every option.
"""
import sys

from minicnn.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
