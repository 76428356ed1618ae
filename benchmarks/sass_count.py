#!/usr/bin/env python
"""SASS instructions of the gather kernels' two index paths: 32-bit (int) against 64-bit (long long).

im2col, col2im and max-pool decompose each thread's flat index with divisions and
remainders. A GPU divides 32-bit integers with a short instruction sequence and
64-bit ones with a much longer one, so these kernels take their ``int`` path where
every index fits (:data:`minicnn.kernels.NARROW_INDEX_LIMIT`) and their ``long long``
path beyond. This script compiles each path alone (the kernel's dispatch replaced by
one of its two calls) with ``nvcc -cubin -arch=sm_90`` and counts the instructions
``cuobjdump -sass`` lists. No GPU needed: nvcc and cuobjdump run on a CPU (cuobjdump
comes with the CUDA toolkit, or from the ``nvidia-cuda-cuobjdump`` wheel).

A static count, not a timing: the loop bodies dominate, but how much faster the
kernels run is for ``bench_layers.py --backend cupy`` on a GPU.

    python benchmarks/sass_count.py [--nvcc PATH] [--cuobjdump PATH]
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import default_json_path, markdown_table, write_json  # noqa: E402
from minicnn import kernels  # noqa: E402

DISPATCH = re.compile(r"if \(fits_int[^\n]*\n\s*(\w+_body<int>\([^;]*;)\n\s*else\n\s*(\w+_body<long long>\([^;]*;)")


def one_path(source: str, path: str) -> str:
    """The kernel with its dispatch replaced by the call of one path (``"int"`` or ``"long long"``)."""
    match = DISPATCH.search(source)
    if match is None:
        raise ValueError("no index-width dispatch found in the kernel source")
    return source[:match.start()] + (match.group(1) if path == "int" else match.group(2)) + source[match.end():]


def count_sass(source: str, name: str, nvcc: str, cuobjdump: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cu, cubin = Path(tmp) / "k.cu", Path(tmp) / "k.cubin"
        cu.write_text(source)
        subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-ftz=true", "-o", str(cubin), str(cu)], check=True,
                       capture_output=True, text=True)
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    # instruction lines look like "        /*0050*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;"
    return sum(1 for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+\S", line))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    p.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    p.add_argument("--json", default=None, help="output JSON (default runs/benchmarks/sass_count.json)")
    args = p.parse_args(argv)
    version = subprocess.run([args.nvcc, "--version"], check=True, capture_output=True, text=True).stdout
    rows = []
    for k in kernels.KERNELS.values():
        if not isinstance(k, kernels.Raw) or "{INDEX_WIDTH}" not in k.source or k.kernel_name("float") in {
                r["kernel"] for r in rows}:
            continue
        name = k.kernel_name("float")
        narrow, wide = (count_sass(one_path(k.code("float"), path), name, args.nvcc, args.cuobjdump)
                        for path in ("int", "long long"))
        rows.append({"kernel": name, "int_path": narrow, "long_long_path": wide, "ratio": round(narrow / wide, 2)})
        print(f"{name}: {narrow} SASS instructions with int indices, {wide} with long long", flush=True)
    print("\nSASS instructions (sm_90, nvcc -O3 -ftz=true), each index path compiled alone; static counts")
    print(markdown_table(rows, ["kernel", "int_path", "long_long_path", "ratio"]))
    out = args.json or default_json_path("sass_count")
    write_json(out, {"benchmark": "sass_count", "arch": "sm_90", "nvcc": version.strip().splitlines()[-1],
                     "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
