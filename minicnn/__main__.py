"""``python -m minicnn COMMAND ...``: the ``minicnn`` command (see :mod:`minicnn.cli`)."""
import sys

from minicnn.cli import main

if __name__ == "__main__":  # importing the module (tests walk the package) must not run the command
    sys.exit(main())
