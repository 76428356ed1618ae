"""README's promises that a test can keep: its code prints what it says, its install lines are right."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import minicnn

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def python_block_after(heading: str) -> str:
    section = README[README.index(heading):]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


def test_the_layers_example_prints_the_gradcheck_output_it_shows(tmp_path, monkeypatch):
    code = python_block_after("## Using the layers")
    shown = [line[1:].strip() for line in code.splitlines() if re.match(r"#\s+\w+: ", line)]
    assert shown, "the example shows no gradcheck output"
    monkeypatch.chdir(tmp_path)  # it saves hw3.npz
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})  # noqa: S102
    finally:
        minicnn.set_default_dtype("float32")
    printed = [line.strip() for line in out.getvalue().splitlines() if "rel. error" in line or "tolerance" in line]
    assert printed == shown


def test_no_install_line_names_the_unrelated_package_on_the_public_index():
    assert not re.search(r"pip install ['\"]?minicnn\[", README)


def test_the_quickstart_test_command_is_what_ci_runs():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "pip install -e '.[dev]' && python -m pytest" in README
    assert re.search(r"^python -m pytest", ci, flags=re.MULTILINE)
