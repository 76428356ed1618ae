"""The tutorials run top to bottom (on small data) and stay valid jupytext notebooks.

Each ``tutorials/NN_*.py`` is executed as a script in a fresh process with
``MINICNN_TUTORIAL_QUICK=1`` (small subsets, one epoch, few repeats): its own
``assert`` statements check what it teaches, so a change in the library that
breaks a tutorial fails here. Tutorials that read FER-2013 are skipped, saying
why, without ``FER2013_DATA``. ``MINICNN_TUTORIAL_TIMEOUT`` (seconds, default
600) bounds each run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
TIMEOUT = float(os.environ.get("MINICNN_TUTORIAL_TIMEOUT", "600"))


def ids(paths):
    return [p.stem for p in paths]


def test_the_series_is_there():
    assert [p.stem[:2] for p in TUTORIALS] == ["01", "02", "03", "04", "05"]


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=ids(TUTORIALS))
def test_tutorial_runs_top_to_bottom(path, tmp_path):
    needs_data = 'os.environ.get("FER2013_DATA")' in path.read_text()  # reads the data (not a mere mention)
    data = os.environ.get("FER2013_DATA")
    if needs_data and not (data and Path(data).exists()):
        pytest.skip(f"{path.name} trains or evaluates on FER-2013: set FER2013_DATA to the image folders")
    out = tmp_path / "out"
    env = dict(os.environ, MINICNN_TUTORIAL_QUICK="1", MINICNN_TUTORIAL_OUT=str(out), MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("MINICNN_TUTORIAL_BACKEND", None)
    run = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert run.returncode == 0, f"{path.name} failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    if path.stem.startswith(("01", "03", "04")):  # 05 draws its figure only where PyTorch is installed
        assert any(out.glob("*.png")), f"{path.name} wrote no figure to MINICNN_TUTORIAL_OUT"


@pytest.mark.parametrize("path", TUTORIALS, ids=ids(TUTORIALS))
def test_tutorial_is_a_jupytext_percent_notebook(path):
    jupytext = pytest.importorskip("jupytext", reason="jupytext renders the tutorials as notebooks: "
                                                      "pip install -e '.[dev]'")
    nb = jupytext.read(path)
    kinds = [cell.cell_type for cell in nb.cells]
    assert kinds[0] == "markdown" and nb.cells[0].source.startswith("# "), "a tutorial opens with its title"
    assert kinds.count("markdown") >= 4 and kinds.count("code") >= 4, kinds
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert jupytext.writes(nb, fmt="ipynb")  # renders to .ipynb


def test_every_tutorial_is_listed_in_the_readmes():
    readme, index = (ROOT / "README.md").read_text(), (ROOT / "tutorials" / "README.md").read_text()
    for path in TUTORIALS:
        assert path.name in index, f"tutorials/README.md does not list {path.name}"
        assert path.name in readme, f"README.md does not list {path.name}"


def _committed_notebooks():
    try:
        files = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return sorted(ROOT.glob("tutorials/**/*.ipynb"))
    return [ROOT / f for f in files.stdout.splitlines()]


def test_no_committed_notebook_carries_image_outputs():
    """Executed notebooks would show FER-2013 faces: only sources, or notebooks without images, are committed."""
    for path in _committed_notebooks():
        nb = json.loads(path.read_text())
        for cell in nb.get("cells", []):
            for output in cell.get("outputs", []):
                assert not any(k.startswith("image/") for k in output.get("data", {})), f"{path} holds an image output"
