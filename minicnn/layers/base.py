"""The two building blocks of every network: :class:`Layer` and :class:`Container`.

A layer is a small object in the manner of "Deep Learning from Scratch":

* ``forward(x, training=True)`` computes the output and keeps on ``self``
  whatever ``backward`` will need (its *cache*);
* ``backward(dout)`` takes dL/d(output), returns dL/d(input) and fills
  ``self.grads`` with dL/d(parameter) under the same keys as ``self.params``.

``params`` hold the trainable arrays, ``buffers`` the non-trainable state that
is saved with the model (BatchNorm's running statistics). Parameters are
always updated *in place* (``W -= lr * dW``), so any dict that refers to them
stays valid; that is what lets a :class:`Container` expose its children's
parameters under prefixed names without copying them.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterator

__all__ = ["Layer", "Container"]


def positive_int(value, what: str) -> int:
    """``value`` as an int after checking it is a whole number >= 1 (a count of channels or features)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a whole number >= 1, got {value!r}")
    return int(value)


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


class Layer:
    """Base class: a differentiable function with optional parameters.

    Every layer implements

    * ``forward(x, training=True) -> out``, keeping on ``self`` what backward needs;
    * ``backward(dout) -> dx``: given dL/d(out), of out's shape, return dL/dx, of x's
      shape, and store dL/d(p) in ``self.grads[key]`` for every ``self.params[key]``.

    Each public layer's own docstring (``help(minicnn.Conv2D)``) gives its
    Shapes, Parameters and Forward / Backward formulas.
    """

    def __init__(self) -> None:
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}

    # -- the two methods every layer implements -----------------------------
    def forward(self, x, training: bool = True):
        """Compute the output for input ``x``; ``training`` selects batch statistics and dropout.

        Keeps on ``self`` whatever :meth:`backward` will need (the cache).
        """
        raise NotImplementedError

    def backward(self, dout):
        """Given ``dout`` = dL/d(out) of the last forward pass, return dL/dx and fill ``self.grads``."""
        raise NotImplementedError

    # The attributes where forward keeps what backward needs; forward_only drops them. A layer that keeps its
    # cache under other names lists them (ReLU: "mask", Dense: "x").
    cache_attrs: tuple[str, ...] = ("cache",)

    def release_cache(self) -> None:
        """Drop what the last forward kept for backward (a backward after this is an error)."""
        for name in self.cache_attrs:
            if hasattr(self, name):
                setattr(self, name, None)

    def _saved(self, name: str = "cache"):
        """What forward kept under ``name`` for backward; an error saying why when there is none."""
        value = getattr(self, name, None)
        if value is None:
            raise RuntimeError(f"{self!r}.backward: nothing saved by a forward pass (backward runs once per forward; "
                               "forward_only and release_cache keep nothing): call forward(x, training) first")
        return value

    def forward_only(self, x, training: bool = False):
        """A forward pass that no backward will follow: the output, with no cache left on ``self``.

        Evaluation, prediction and BatchNorm recalibration need only the output. A plain
        ``forward`` keeps every layer's cache until the next one (a convolution's im2col
        matrix is 9 x its input), so a network's evaluation would hold them all at once:
        ``ece662_resnet`` held 11.2 GiB for a batch of 256 (``benchmarks/bench_eval_memory.py``; 0.7 GiB
        with this method). A container overrides this to drop each child's cache as soon as the next
        child has its input, so memory peaks at one layer.
        """
        out = self.forward(x, training)
        self.release_cache()
        return out

    def __call__(self, x, training: bool = False):
        """``layer(x)`` is inference: ``forward(x, training=False)``, which changes no state.

        Training goes through the explicit ``forward(x, training=True)`` (BatchNorm then
        updates its running statistics, Dropout drops), so calling a trained network to
        look at its outputs never alters it.
        """
        return self.forward(x, training)

    # -- helpers --------------------------------------------------------------
    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""

    def children(self) -> Iterator[tuple[str, "Layer"]]:
        """(name, layer) of direct sub-layers; none for a plain layer."""
        return iter(())

    def num_params(self) -> tuple[int, int]:
        """(trainable, non-trainable) element counts."""
        trainable = sum(int(p.size) for p in self.params.values())
        frozen = sum(int(b.size) for b in self.buffers.values())
        return trainable, frozen

    def astype(self, dtype) -> "Layer":
        """Cast every parameter and buffer to ``dtype`` (e.g. float64 for checks)."""
        for store in (self.params, self.buffers):
            for k in list(store):
                if hasattr(store[k], "astype") and store[k].dtype.kind == "f":
                    store[k] = store[k].astype(dtype)
        self.grads = {}
        return self

    def to(self, backend_xp) -> "Layer":
        """Move parameters and buffers to the array module ``backend_xp``."""
        from ..backend import to_host  # noqa: PLC0415

        for store in (self.params, self.buffers):
            for k in list(store):
                host = to_host(store[k])
                store[k] = host if backend_xp.__name__ == "numpy" else backend_xp.asarray(host)
        self.grads = {}
        return self

    def _check_dout(self, dout, expected) -> None:
        """Refuse a ``dout`` whose shape is not ``expected``, that of the last forward pass's output.

        Without it a wrong upstream gradient fails deep inside a matrix product or a broadcast, or, worse,
        broadcasts silently into a gradient of the wrong values.
        """
        if tuple(dout.shape) != tuple(expected):
            raise ValueError(f"{self!r}.backward: expected dout of shape {_shape_str(tuple(expected))} (the shape of "
                             f"the last forward pass's output), got {_shape_str(dout.shape)}")

    def _bad_input(self, expected: str, x) -> ValueError:
        """A ValueError naming this layer, the expected and the received shape."""
        return ValueError(f"{self!r}: expected input of shape {expected}, got {_shape_str(x.shape)}")


class Container(Layer):
    """A layer made of named sub-layers.

    ``params``, ``grads`` and ``buffers`` are views that merge the children's
    dicts under ``"<child>.<key>"`` names; ``astype``/``to`` recurse. A
    subclass writes ``forward`` and ``backward`` by calling its children's,
    the backward ones in reverse order (see :class:`minicnn.Sequential`,
    :class:`minicnn.ResidualBlock`).
    """

    def __init__(self) -> None:
        super().__init__()
        self._children: dict[str, Layer] = {}

    def add(self, name: str, layer: Layer) -> Layer:
        """Register ``layer`` as the child ``name`` (its parameters appear as ``"<name>.<key>"``); returns it."""
        if not isinstance(layer, Layer):
            raise TypeError(f"{name!r} must be a minicnn Layer, got {type(layer).__name__}")
        self._children[name] = layer
        return layer

    def children(self):
        return iter(self._children.items())

    def _merged(self, attr: str) -> dict:
        merged = {}
        for cname, child in self._children.items():
            for k, v in getattr(child, attr).items():
                merged[f"{cname}.{k}"] = v
        return merged

    # Plain layers set these attributes in __init__; here they are computed.
    params = property(lambda self: self._merged("params"), lambda self, v: None)
    grads = property(lambda self: self._merged("grads"), lambda self, v: None)
    buffers = property(lambda self: self._merged("buffers"), lambda self, v: None)

    def release_cache(self) -> None:
        for _, child in self.children():
            child.release_cache()

    def astype(self, dtype):
        for _, child in self.children():
            child.astype(dtype)
        return self

    def to(self, backend_xp):
        for _, child in self.children():
            child.to(backend_xp)
        return self

    def assign(self, attr: str, name: str, value) -> None:
        """Replace the array ``name`` of ``params`` or ``buffers`` in the owning child."""
        head, _, rest = name.partition(".")
        child = self._children[head]
        if isinstance(child, Container):
            child.assign(attr, rest, value)
        else:
            getattr(child, attr)[rest] = value
