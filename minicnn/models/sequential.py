"""The :class:`Sequential` container: a stack of layers applied in order."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, get_default_dtype, module_of, to_array_module, to_host
from ..checkpoint import CheckpointError, dequantize_int8, load_npz, save_npz
from ..layers.base import Container, Layer

__all__ = ["Sequential"]


class Sequential(Container):
    """Layers applied one after the other; itself a :class:`Layer`.

    Shapes:
        x: what the first layer takes (the zoo's: (N, 1, 48, 48))  ->  the last layer's output
        (the zoo's: logits (N, K))

    Parameters:
        layers: the layers, in order (more can be added with :meth:`append`).
        input_shape: one input without the batch axis, e.g. ``(1, 48, 48)`` (for :meth:`summary`).
        name, config: stored in saved files so that :func:`minicnn.build_model` can rebuild the model.

    Forward:  out = f_L(... f_2(f_1(x)))
    Backward: the chain rule, last layer first: dout_{l-1} = f_l.backward(dout_l), ending with dx;
              every layer fills its own ``grads`` on the way (``model.grads`` collects them).

    ``forward(x, training)`` runs the layers in order and ``backward(dout)``
    in reverse, each layer keeping what its backward needs. Training and
    evaluation differ only through the explicit ``training`` argument
    (BatchNorm and Dropout read it); :meth:`predict` is the evaluation-mode
    forward in batches.

    Parameters are named ``"<index>.<key>"`` (``"0.W"``, ``"1.gamma"``, and
    ``"4.conv1.W"`` inside a residual block); :meth:`save` and :meth:`load`
    use these names.

    ``input_shape`` (without the batch axis, e.g. ``(1, 48, 48)``) is needed
    by :meth:`summary`; ``name`` and ``config`` are stored in saved files so a
    model zoo entry can be rebuilt from them.
    """

    def __init__(self, layers=(), input_shape=None, name="sequential", config=None):
        super().__init__()
        self.layers: list[Layer] = []
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.name = name
        self.config = dict(config or {})
        for layer in layers:
            self.append(layer)

    def append(self, layer: Layer) -> "Sequential":
        self.add(str(len(self.layers)), layer)
        self.layers.append(layer)
        return self

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        inner = "\n".join(f"  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential[{self.name}](\n{inner}\n)"

    # -- computation ----------------------------------------------------------
    def forward(self, x, training=True):
        """Run every layer in order on ``x``, in training or evaluation mode."""
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def forward_only(self, x, training=False):
        """The output of :meth:`forward`, releasing each layer's cache as soon as it has run (no backward follows).

        Memory then peaks at the largest layer's working set instead of the sum of all of them.
        """
        for layer in self.layers:
            x = layer.forward_only(x, training)
        return x

    def backward(self, dout):
        """dL/d(logits) -> dL/dx, through every layer's backward in reverse order (fills ``grads``)."""
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout

    # -- inference: evaluation mode, in batches, nothing changes ----------------------
    def predict_logits(self, x, batch_size=256):
        """Evaluation-mode logits ``(N, K)`` for inputs ``x`` ``(N, C, H, W)`` (host or device), in batches.

        The batches go to the model's own device, and so does the result.
        """
        outs = []
        xp = module_of(self)
        for start in range(0, len(x), batch_size):
            xb = to_array_module(x[start : start + batch_size], xp, dtype=self.dtype)
            outs.append(self.forward_only(xb))
        xp = get_array_module(outs[0]) if outs else np
        return xp.concatenate(outs) if outs else xp.zeros((0,))

    def predict_proba(self, x, batch_size=256):
        """Softmax probabilities ``(N, K)``, a NumPy array whose rows sum to 1 (evaluation mode)."""
        from ..inference import predict_proba  # noqa: PLC0415  (inference imports models)

        return predict_proba(self, x, batch_size)

    def predict(self, x, batch_size=256):
        """Predicted class ids ``(N,)`` (int64, NumPy): the arg-max of the logits, in evaluation mode."""
        return np.asarray(to_host(self.predict_logits(x, batch_size).argmax(axis=1)), dtype=np.int64)

    # -- Keras-style conveniences over minicnn.training.Trainer -------------------------
    def fit(self, x, y, *, validation_data=None, epochs=10, batch_size=128, optimizer="adam", lr=1e-3,
            loss=None, schedule=None, augmenter=None, seed=0, out_dir=None, progress=True, log=print,
            **trainer_options):
        """Train on ``x``, ``y``; returns the history (a dict per epoch: losses, accuracies, lr, seconds).

        Shapes: x (N, C, H, W) normalised inputs, y (N,) class ids

        Parameters:
            validation_data: ``(x_val, y_val)``, evaluated after every epoch (best epoch -> ``best.npz``).
            epochs, batch_size, seed: as for :class:`~minicnn.training.Trainer`.
            optimizer: a name (``"adam"``, ``"sgd"``, ``"adamw"``, ``"rmsprop"``, built with ``lr``) or an
                optimiser already built on this model.
            loss: defaults to softmax cross-entropy; ``schedule``, ``augmenter``: optional.
            out_dir: keep checkpoints (``last.npz``, ``best.npz``) and the history there.
            trainer_options: more :class:`~minicnn.training.Trainer` keywords (``clip_norm``,
                ``early_stopping``, ``log_every``, ``precise_bn``, ...).

        A thin layer over the Trainer, which stays the documented, resumable way to train.
        """
        from ..optim import make_optimizer  # noqa: PLC0415
        from ..training import Trainer  # noqa: PLC0415

        if isinstance(optimizer, str):
            optimizer = make_optimizer(optimizer, self, lr=lr)
        x_val, y_val = validation_data if validation_data is not None else (None, None)
        trainer = Trainer(self, optimizer, loss, schedule, augmenter, batch_size=batch_size, seed=seed,
                          out_dir=out_dir, progress=progress, **trainer_options)
        return trainer.fit(x, y, x_val, y_val, epochs=epochs, log=log)

    def evaluate(self, x, y, batch_size=512, loss=None) -> dict:
        """``{"loss": mean loss, "accuracy": fraction correct}`` on ``x``, ``y``, in evaluation mode.

        Shapes: x (N, C, H, W), y (N,) class ids

        Parameters:
            batch_size: images per forward pass; loss: defaults to softmax cross-entropy.
        """
        from ..training import Trainer  # noqa: PLC0415

        mean_loss, accuracy = Trainer(self, None, loss, progress=False).evaluate(x, y, batch_size)
        return {"loss": mean_loss, "accuracy": accuracy}

    @property
    def dtype(self):
        for p in self.params.values():
            return p.dtype
        return get_default_dtype()

    # -- parameters -------------------------------------------------------------
    def named_parameters(self):
        """(name, array) for every trainable parameter."""
        return iter(self.params.items())

    # -- summary ------------------------------------------------------------------
    def summary(self, print_fn=print) -> str:
        """Table of every layer's output shape and parameter counts; returns the text.

        "Trainable" counts ``params``; "non-trainable" counts ``buffers``
        (BatchNorm's running statistics), as Keras does.
        """
        if self.input_shape is None:
            raise ValueError("summary() needs the model's input_shape, e.g. Sequential(..., input_shape=(1, 48, 48))")
        xp = get_array_module(*self.params.values())
        x = xp.zeros((2,) + self.input_shape, dtype=self.dtype)
        rows = [("Layer", "Output shape", "Trainable", "Non-trainable")]
        total_t = total_n = 0
        for i, layer in enumerate(self.layers):
            x = layer.forward(x, training=False)
            t, n = layer.num_params()
            total_t, total_n = total_t + t, total_n + n
            rows.append((f"({i}) {layer!r}", "(N, " + ", ".join(map(str, x.shape[1:])) + ")", f"{t:,}", f"{n:,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        line = "-" * (sum(widths) + 6)
        fmt = lambda r: f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}"  # noqa: E731
        out = [f"Model: {self.name}   input (N, " + ", ".join(map(str, self.input_shape)) + ")", line, fmt(rows[0]), line]
        out += [fmt(r) for r in rows[1:]]
        out += [
            line,
            f"Trainable params: {total_t:,}",
            f"Non-trainable params: {total_n:,}",
            f"Total params: {total_t + total_n:,}",
        ]
        text = "\n".join(out)
        if print_fn is not None:
            print_fn(text)
        return text

    def count_params(self) -> tuple[int, int]:
        """(trainable, non-trainable) element counts."""
        return (sum(int(p.size) for p in self.params.values()), sum(int(b.size) for b in self.buffers.values()))

    # -- persistence ----------------------------------------------------------------
    def state_arrays(self) -> dict:
        """``{"param/<name>": array, "buffer/<name>": array}`` for saving."""
        arrays = {f"param/{k}": v for k, v in self.params.items()}
        arrays.update({f"buffer/{k}": v for k, v in self.buffers.items()})
        return arrays

    def load_state_arrays(self, arrays: dict, source="arrays") -> None:
        """Copy saved arrays into the model *in place*, after checking every name and shape.

        Nothing is changed unless every expected array is present with the right
        shape and nothing unexpected is there.
        """
        expected = {k: v for k, v in self.state_arrays().items()}
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        problems = []
        if missing:
            problems.append(f"missing arrays {missing}")
        if extra:
            problems.append(f"unexpected arrays {extra}")
        for k in sorted(set(expected) & set(arrays)):
            if tuple(arrays[k].shape) != tuple(expected[k].shape):
                problems.append(f"{k!r} has shape {tuple(arrays[k].shape)}, expected {tuple(expected[k].shape)}")
            elif arrays[k].dtype.kind not in "fiu":
                problems.append(f"{k!r} has dtype {arrays[k].dtype}, expected a numeric array")
        if problems:
            raise CheckpointError(f"{source} does not fit model {self.name!r}: " + "; ".join(problems))
        for k, target in expected.items():
            xp = get_array_module(target)
            target[...] = xp.asarray(to_host(arrays[k]) if xp is np else arrays[k], dtype=target.dtype)

    def save(self, path, extra_meta: dict | None = None):
        """Save parameters and buffers to ``path`` (.npz, atomic, no pickle)."""
        meta = {"format": "minicnn.model/1", "name": self.name, "config": self.config,
                "input_shape": list(self.input_shape) if self.input_shape else None}
        meta.update(extra_meta or {})
        return save_npz(path, self.state_arrays(), meta)

    def load(self, path) -> dict:
        """Load weights saved by :meth:`save` into this model; returns the file's metadata.

        Raises :class:`~minicnn.checkpoint.CheckpointError` (a ValueError) naming the
        file and every problem, and leaves the model unchanged, when the file is not
        a minicnn file, holds pickled objects, or has missing, extra or misshaped arrays.
        """
        arrays, meta = load_npz(path)
        # A training checkpoint also holds optimiser state ("optim/...") and may hold
        # normalisation statistics ("data/..."): those are not the model's business.
        arrays = {k: v for k, v in arrays.items() if not k.startswith(("optim/", "data/", "schedule/"))}
        self.load_state_arrays(dequantize_int8(arrays, source=str(path)), source=str(path))
        return meta
