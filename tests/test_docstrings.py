"""Every public name documents itself: what ``help()`` shows a student must be enough to check the code.

Rules (applied mechanically, so a new public name is held to them too):

* every module, class and function in ``minicnn.__all__`` and ``minicnn.reference.__all__``
  has a docstring of its own (not one inherited from a private base class);
* a layer or loss (a class with a ``backward``) shows ``Shapes:``, ``Parameters:`` and its
  ``Backward`` formulas in its *own* docstring, and every ``forward``/``backward`` it can
  call has a docstring;
* a class that defines ``__init__`` with arguments, and a function with arguments, has a
  ``Parameters:`` section; a function taking arrays (an argument named like one) has ``Shapes:``;
* a public value that is neither (``MODELS``) is described in its module's docstring.
"""
import inspect
import pydoc
import re
import types

import pytest

import minicnn
from minicnn import reference

#: argument names that mean "an array": a function taking one documents its shapes
ARRAY_ARGS = {"x", "z", "cols", "logits", "labels", "W", "b", "dout", "images", "dx", "g", "w"}
#: abstract bases: they define the contract, not a computation with shapes
ABSTRACT = {minicnn.Layer, minicnn.Container}


def public_names():
    for name in minicnn.__all__:
        yield f"minicnn.{name}", getattr(minicnn, name)
    for name in reference.__all__:
        yield f"minicnn.reference.{name}", getattr(reference, name)


NAMES = list(public_names())


def own_doc(obj) -> str:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    return inspect.cleandoc(doc or "")


def has_section(doc: str, title: str) -> bool:
    """A line starting with ``Title:`` (a block or a one-line ``Parameters: none.``)."""
    return re.search(rf"^\s*{title}:", doc, flags=re.MULTILINE) is not None


def arguments(fn) -> list[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [p for p in sig.parameters if p != "self"]


def test_every_public_name_is_checked():
    assert len(NAMES) == len(minicnn.__all__) + len(reference.__all__)
    assert "reference" in minicnn.__all__


@pytest.mark.parametrize("qualname,obj", NAMES, ids=[n for n, _ in NAMES])
def test_public_name_is_documented(qualname, obj):
    if isinstance(obj, types.ModuleType):
        assert own_doc(obj), f"module {qualname} has no docstring"
        return
    if not callable(obj):  # a public value: its defining module must describe it
        short = qualname.rsplit(".", 1)[1]
        module = next(m for m in (minicnn.models.zoo, minicnn.models, minicnn) if short in vars(m))
        assert short in (module.__doc__ or ""), f"{qualname} is not described in {module.__name__}'s docstring"
        return
    doc = own_doc(obj)
    assert doc, f"{qualname} has no docstring of its own"
    if isinstance(obj, type):
        if hasattr(obj, "backward") and obj not in ABSTRACT:
            for section in ("Shapes", "Parameters"):
                assert has_section(doc, section), f"help({qualname}) has no '{section}:' section"
            # A "Backward" section (a line that starts with it, e.g. "Backward: dx = ..." or "Backward, training
            # mode ..."), not merely the word somewhere in the text.
            assert re.search(r"^\s*Backward\b", doc, re.MULTILINE), f"help({qualname}) has no 'Backward' section"
        if "__init__" in obj.__dict__ and arguments(obj.__init__) and obj not in ABSTRACT:
            assert has_section(doc, "Parameters"), f"help({qualname}) has no 'Parameters:' section"
        for method in ("forward", "backward"):
            if hasattr(obj, method):
                assert getattr(obj, method).__doc__, f"{qualname}.{method} has no docstring"
        return
    args = arguments(obj)
    if args:
        assert has_section(doc, "Parameters"), f"{qualname} has arguments {args} but no 'Parameters:' section"
    if ARRAY_ARGS & set(args):
        arrays = sorted(ARRAY_ARGS & set(args))
        assert has_section(doc, "Shapes"), f"{qualname} takes arrays {arrays} but has no 'Shapes:' section"


@pytest.mark.parametrize("cls", [minicnn.BatchNorm1D, minicnn.BatchNorm2D, minicnn.MaxPool2D, minicnn.AvgPool2D,
                                 minicnn.Conv2D, minicnn.Dense, minicnn.Dropout])
def test_help_shows_the_backward_formulas_of_the_class_itself(cls):
    """README tells students to run help(minicnn.BatchNorm2D): it must show the formulas, not one line."""
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    first = text.split("Method resolution order")[0]  # the class's own part of help()
    assert "Shapes:" in first and "Backward" in first
    assert len(own_doc(cls).splitlines()) >= 10


def test_conv2d_says_it_is_a_cross_correlation():
    assert "cross-correlation" in own_doc(minicnn.Conv2D)
    assert "not flipped" in own_doc(minicnn.Conv2D)


def test_batchnorm_docstrings_carry_both_modes_and_their_own_shapes():
    one, two = own_doc(minicnn.BatchNorm1D), own_doc(minicnn.BatchNorm2D)
    for doc in (one, two):
        assert "dgamma" in doc and "running_var" in doc and "evaluation mode" in doc
    assert "x (N, D)" in one and "x (N, C, H, W)" in two


def _all_classes():
    import importlib  # noqa: PLC0415
    import pkgutil  # noqa: PLC0415

    for info in pkgutil.walk_packages(minicnn.__path__, "minicnn."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if isinstance(obj, type) and obj.__module__ == module.__name__:
                yield obj


def test_every_backward_in_the_package_has_a_docstring():
    """Private classes too: whoever reads a backward pass finds what it computes."""
    missing = [f"{cls.__module__}.{cls.__qualname__}.{name}" for cls in _all_classes()
               for name in ("forward", "backward") if name in vars(cls) and not vars(cls)[name].__doc__]
    assert not missing, missing
