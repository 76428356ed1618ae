"""``python -m minicnn COMMAND ...``: the ``minicnn`` command (see :mod:`minicnn.cli`)."""
import sys

from minicnn.cli import main

sys.exit(main())
