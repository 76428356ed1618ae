"""``import cupy`` gives the strict stand-in (tests/fakecupy.py): for running scripts without a GPU.

    PYTHONPATH=.:tests/standin:tests python examples/fer2013/train.py --backend cupy --limit 256 --epochs 1

Test-only: this folder is never on the path of a real installation. The run's ledger
(launches, host syncs with their lines, copies) is printed at exit when
``FAKECUPY_REPORT=1``.
"""
import atexit
import os
import sys

import fakecupy

fakecupy.install()
sys.modules[__name__] = fakecupy  # what `import cupy` returns from now on

if os.environ.get("FAKECUPY_REPORT") == "1":
    atexit.register(lambda: print(f"fakecupy: {fakecupy.ledger.summary()}", file=sys.stderr))
