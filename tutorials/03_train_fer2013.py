# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Training a small CNN on FER-2013, on a laptop CPU
#
# FER-2013 holds 48x48 grey faces in 7 expression classes (angry, disgust, fear, happy, sad,
# surprise, neutral). This tutorial trains a small network, three conv blocks and one dense
# layer, on a few thousand training images in a few minutes of CPU time, with the pieces a
# real run uses (`examples/fer2013/train.py` puts the same pieces together for the full
# dataset):
#
# loading (`minicnn.data.load_fer2013`) → a stratified validation split → per-pixel
# normalisation → a `Sequential` model → Adam → `minicnn.training.Trainer` with augmentation →
# accuracy on the test split.
#
# The data: set `FER2013_DATA` to the folder with `train/<class>/*.jpg` and
# `test/<class>/*.jpg` (or to Kaggle's `fer2013.csv`). The rules of the game: train on
# *Training*, choose on a validation split carved out of it, and look at *PublicTest*
# (`test/`) once, at the end.

# %%
import os
import time
from pathlib import Path

import numpy as np

import minicnn
from minicnn import metrics
from minicnn.data import Augmenter, Normalizer, load_fer2013, stratified_split
from minicnn.optim import Adam
from minicnn.training import Trainer

QUICK = os.environ.get("MINICNN_TUTORIAL_QUICK") == "1"  # CI: a tiny subset, one epoch
OUT = Path(os.environ.get("MINICNN_TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(parents=True, exist_ok=True)
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # tutorials/, as a notebook too
# FER2013_DATA, else data/fer2013 in the checkout, else shared/data/fer2013 beside the checkout
CANDIDATES = [os.environ.get("FER2013_DATA"), HERE.parent / "data" / "fer2013",
              HERE.parent.parent / "shared" / "data" / "fer2013"]
DATA = next((c for c in CANDIDATES if c and Path(c).exists()), None)
if DATA is None:
    raise SystemExit("FER-2013 not found: set FER2013_DATA to the folder with train/<class>/*.jpg "
                     "and test/<class>/*.jpg")

TRAIN_IMAGES = 600 if QUICK else 6000  # a subset of the 25,838 images left after the validation split
EPOCHS = 1 if QUICK else 6
TEST_IMAGES = 300 if QUICK else None  # None: the whole PublicTest split (3,589 images)
minicnn.seed(0)

# %% [markdown]
# ## Data
#
# `load_fer2013` decodes the images once and caches the arrays (`~/.cache/minicnn`), so the
# next load takes a second. Images are `uint8` arrays `(N, 48, 48)`; labels integers `0..6`.

# %%
start = time.perf_counter()
ds = load_fer2013(DATA)
print(ds, f"loaded in {time.perf_counter() - start:.1f} s")
print("classes:", ds.class_names)
train_all, val = stratified_split(ds.split("Training"), 0.1, seed=0)
test = ds.split("PublicTest")
rng = np.random.default_rng(0)
train = train_all.subset(np.sort(rng.permutation(len(train_all))[:TRAIN_IMAGES]))
val = val.subset(np.sort(rng.permutation(len(val))[: max(300, TRAIN_IMAGES // 5)]))
if TEST_IMAGES:
    test = test.subset(np.sort(rng.permutation(len(test))[:TEST_IMAGES]))
print(f"train {len(train)}, validation {len(val)}, test {len(test)}")
print("training images per class:", train.class_counts())

# %% [markdown]
# The classes are unbalanced (few *disgust*, many *happy*): always compare with the
# majority-class baseline, the accuracy of always answering the most frequent class.
#
# **Normalisation**: subtract the mean training image and divide by the standard deviation,
# pixel by pixel (`Normalizer("per_pixel")`, fitted on the training images only). The model
# input is float32 `(N, 1, 48, 48)`, NCHW.

# %%
norm = Normalizer("per_pixel").fit(train.images)
x_train, y_train = norm.transform(train.images), train.labels
x_val, y_val = norm.transform(val.images), val.labels
x_test, y_test = norm.transform(test.images), test.labels
print("model input:", x_train.shape, x_train.dtype, f"mean {x_train.mean():.3f}, std {x_train.std():.3f}")
majority = np.bincount(y_train).argmax()
print(f"majority class: {ds.class_names[majority]}, test accuracy of always answering it: "
      f"{(y_test == majority).mean():.1%}")

# %% [markdown]
# ## The model
#
# Three blocks of 3x3 convolution → BatchNorm → ReLU → 2x2 max-pool halve the image
# 48 → 24 → 12 → 6 while the channels grow 16 → 32 → 64; dropout and a dense layer map the
# 64 x 6 x 6 features to 7 scores (logits). The convolutions have no bias: the BatchNorm after
# each has its own shift `beta`.

# %%
def small_cnn(num_classes=7):
    def block(c_in, c_out):
        return [minicnn.Conv2D(c_in, c_out, 3, padding=1, bias=False), minicnn.BatchNorm2D(c_out), minicnn.ReLU(),
                minicnn.MaxPool2D(2)]
    return minicnn.Sequential(
        block(1, 16) + block(16, 32) + block(32, 64)
        + [minicnn.Flatten(), minicnn.Dropout(0.3), minicnn.Dense(64 * 6 * 6, num_classes)],
        input_shape=(1, 48, 48), name="tutorial_cnn")


model = small_cnn(len(ds.class_names))
model.summary()

# %% [markdown]
# ## One training step by hand
#
# Before handing the loop to the `Trainer`, here is what it does for every batch: forward in
# training mode, the loss, backward from the loss's gradient (every layer fills its `grads`),
# one optimiser step.

# %%
loss_fn = minicnn.SoftmaxCrossEntropy()
optimizer = Adam(model, lr=1e-3)
xb, yb = x_train[:32], y_train[:32]
logits = model.forward(xb, training=True)
loss = loss_fn.forward(logits, yb)
model.backward(loss_fn.backward())
print(f"loss before the step {float(loss):.4f} (ln 7 = {np.log(7):.4f} for a uniform guess)")
print("gradient of the first conv:", model.grads["0.W"].shape, f"norm {np.linalg.norm(model.grads['0.W']):.3f}")
optimizer.step()
print(f"loss on the same batch after one step: {float(loss_fn.forward(model.forward(xb, training=True), yb)):.4f}")

# %% [markdown]
# One Adam step moves every weight by about `lr` in the direction that lowers the loss *of this
# batch*; with 16,128 dense weights acting together, that is enough to nearly memorise 32 images.
# What matters is the loss on images the step did not see, which is why training walks through
# the whole training set, batch after batch, and watches a validation split.

# %% [markdown]
# ## Training
#
# The `Trainer` shuffles, augments (random horizontal flips and small rotations, so the network
# sees new variants of the faces each epoch), evaluates on the validation split after each epoch
# and keeps the history.

# %%
minicnn.seed(0)
model = small_cnn(len(ds.class_names))  # start again from a fresh initialisation
optimizer = Adam(model, lr=1e-3)
trainer = Trainer(model, optimizer, augmenter=Augmenter(flip=True, rotation=10, seed=0), batch_size=64, seed=0,
                  progress=False)
start = time.perf_counter()
history = trainer.fit(x_train, y_train, x_val, y_val, epochs=EPOCHS)
train_seconds = time.perf_counter() - start
print(f"{EPOCHS} epochs of {len(x_train)} images in {train_seconds:.0f} s")

# %%
import matplotlib.pyplot as plt  # noqa: E402

epochs = [h["epoch"] for h in history]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
ax1.set_xlabel("epoch")
ax1.set_ylabel("cross-entropy")
ax1.legend()
ax2.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
ax2.plot(epochs, [h["val_acc"] for h in history], "o-", label="validation")
ax2.set_xlabel("epoch")
ax2.set_ylabel("accuracy")
ax2.legend()
fig.tight_layout()
fig.savefig(OUT / "03_history.png", dpi=80)
plt.show()

# %% [markdown]
# ## Test accuracy, once
#
# `model.predict` runs the evaluation-mode forward pass (BatchNorm uses its running statistics,
# dropout is off) in batches.

# %%
pred = model.predict(x_test)  # class ids
test_acc = metrics.accuracy(y_test, pred)
baseline = float((y_test == majority).mean())
print(f"test accuracy {test_acc:.1%} (majority class {baseline:.1%}, chance 1/7 = {1 / 7:.1%})")
report = metrics.classification_report(y_test, pred, ds.class_names)
for name in ds.class_names:
    r = report["per_class"][name]
    print(f"  {name:>9}: recall {r['recall']:.2f}  precision {r['precision']:.2f}  ({r['support']} images)")
assert np.isfinite(history[-1]["train_loss"])
if not QUICK:  # a few minutes of training must clearly beat always answering "happy"
    assert test_acc > baseline + 0.05, (test_acc, baseline)

# %% [markdown]
# With 6,000 images and 6 epochs this network reached **43.1 %** on the 3,589 PublicTest images
# (majority class 24.9 %; validation 43.8 %) when this tutorial was written, in 612 s on the
# project's 2-core VM while other jobs shared it (44 to 229 s per epoch as the load changed;
# about 4.5 minutes at the fastest epoch's pace). The
# full recipe (`python examples/fer2013/train.py`, all 25,838 training images, augmentation,
# 40+ epochs of the 1.7-million-parameter `hw3_cnn`) reaches 62-65 % (README, "Results").
# Things to try: more images (`TRAIN_IMAGES`), more epochs, wider layers, a second conv per
# block, and watching the gap between training and validation accuracy grow when you remove the
# augmentation or the dropout.
#
# Save the weights (`.npz`, no pickle) to reuse them:

# %%
model.save(OUT / "tutorial_cnn.npz")
copy = small_cnn(len(ds.class_names))
copy.load(OUT / "tutorial_cnn.npz")
assert np.array_equal(copy.predict(x_test[:16]), model.predict(x_test[:16]))
print("saved to", OUT / "tutorial_cnn.npz", "and loaded back: same predictions")
