"""``python -m minicnn COMMAND ...``: the ``minicnn`` command (see :mod:`minicnn.cli`)."""
import sys

from minicnn.cli import main

if __name__ == "__main__":  # importing this module (e.g. while walking the package) runs nothing
    sys.exit(main())
