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
# # 4. Looking inside a trained network
#
# minicnn ships trained weights inside the package (`minicnn.pretrained("hw3_cnn")`), the 1.7-million
# parameter network of the HW3 report (65.3 % on PublicTest, README "Results"). This tutorial
# opens it and asks what it learned:
#
# * **filters**: the first layer's 3x3 kernels;
# * **confusion**: which expressions it mixes up;
# * **saliency**: which pixels its decision depends on, `|d score / d pixel|`, computed with the
#   network's own backward pass;
# * **activations**: what the second conv block responds to, and which images excite it most.
#
# **Privacy.** Saliency and activation figures show FER-2013 faces. They are written to
# `tutorial_output/` (ignored by git) and shown here; do not commit an executed copy of this
# notebook (`tutorials/*.ipynb` is ignored by git for that reason). The filter, confusion and
# average-saliency figures contain no face.

# %%
import os
from pathlib import Path

import numpy as np

import minicnn
from minicnn import metrics
from minicnn import visualize as viz
from minicnn.data import Normalizer, load_fer2013
from minicnn.classifier import pretrained_path
from minicnn.training import load_checkpoint

QUICK = os.environ.get("MINICNN_TUTORIAL_QUICK") == "1"  # CI: a few hundred test images
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


def show(path):
    """Show a saved figure inline in a notebook; in a script, say where it is."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
        if get_ipython() is not None:
            display(Image(filename=str(path)))
            return
    except ImportError:
        pass
    print("figure:", path)


# %% [markdown]
# ## The checkpoint
#
# A checkpoint is an `.npz` file (loaded without pickle): the weights, the BatchNorm running
# statistics, the model's name and configuration (so the zoo rebuilds it), the class names and
# the normalisation statistics the network was trained with. New images must be normalised the
# same way.

# %%
model, arrays, meta = load_checkpoint(pretrained_path("hw3_cnn"))  # minicnn/pretrained/hw3_cnn.npz
norm = Normalizer.from_arrays(arrays, prefix="data/norm/")
class_names = list(meta["class_names"])
model.summary()
print("classes:", class_names, "| normalisation:", norm)

# %% [markdown]
# ## First-layer filters
#
# Each of the 32 first-layer kernels is a 3x3 pattern that is correlated with every patch of the
# face (light: positive weight, dark: negative). Trained kernels look like small edge and
# gradient detectors in various orientations: the first layer measures local contrast.

# %%
show(viz.plot_filters(model, OUT / "04_filters.png"))
W = minicnn.to_host(model.layers[0].params["W"])
print("first conv weight:", W.shape, "(C_out, C_in, KH, KW)")
# Edge detectors respond to differences, not to brightness: most kernels sum to far less than their size.
contrast = np.abs(W.sum(axis=(1, 2, 3))).mean() / np.abs(W).sum(axis=(1, 2, 3)).mean()
print(f"mean |sum of a kernel| / mean sum of |weights|: {contrast:.2f}")

# %% [markdown]
# ## Confusion on PublicTest
#
# `predict_proba` runs the evaluation-mode forward pass (BatchNorm with running statistics, no
# dropout) in batches. Row *i* of the confusion matrix: how the images of true class *i* were
# classified (normalised per row, so the diagonal is each class's recall).

# %%
from minicnn.inference import predict_proba  # noqa: E402

test = load_fer2013(DATA).split("PublicTest")
if QUICK:
    test = test.subset(np.sort(np.random.default_rng(0).permutation(len(test))[:400]))
x_test = norm.transform(test.images).astype(np.float32)
probs = predict_proba(model, x_test)
pred = probs.argmax(axis=1)
report = metrics.classification_report(test.labels, pred, class_names)
print(f"accuracy on {len(test)} PublicTest images: {report['accuracy']:.1%}")
show(viz.plot_confusion_matrix(report["confusion_matrix"], class_names, OUT / "04_confusion_matrix.png"))
cm = np.array(report["confusion_matrix_normalized"])
off = cm - np.diag(np.diag(cm))
i, j = np.unravel_index(off.argmax(), off.shape)
print(f"most frequent confusion: {cm[i, j]:.0%} of '{class_names[i]}' images are called '{class_names[j]}'")
assert report["accuracy"] > 0.5  # the shipped network, far above the 25 % of always answering "happy"

# %% [markdown]
# ## Saliency: which pixels does the decision rest on?
#
# For an image `x` and the score (logit) `s_c` of the predicted class `c`, the saliency of a
# pixel is `|d s_c / d x|` (Simonyan et al., 2014). minicnn needs no autograd for it: a forward
# pass in evaluation mode, then `model.backward` of a one-hot upstream gradient on class `c`
# returns `d s_c / d x`, the same backward pass training uses, only stopped at the input.
#
# First without faces: the saliency averaged over many test images shows where the network
# looks on average.

# %%
sal = viz.saliency_maps(model, x_test[:64 if QUICK else 512])
mean_sal = sal.mean(axis=0)
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(3.5, 3.2))
im = ax.imshow(mean_sal / mean_sal.max(), cmap="jet")
ax.set_title(f"mean saliency over {len(sal)} faces")
ax.set_xticks([])
ax.set_yticks([])
fig.colorbar(im, ax=ax, fraction=0.046)
fig.savefig(OUT / "04_mean_saliency.png", dpi=80)
plt.show()
centre, border = mean_sal[12:36, 12:36].mean(), np.concatenate([mean_sal[:6].ravel(), mean_sal[-6:].ravel()]).mean()
print(f"mean saliency in the central 24x24 pixels: {centre / border:.1f}x that of the top and bottom 6 rows")
assert centre > 1.5 * border  # the decision rests on the face, not on the background

# %% [markdown]
# And for single images (this figure shows faces): the image, its saliency map, and the image
# with all but the 25 % most salient pixels greyed out.

# %%
idx = [int(np.flatnonzero(test.labels == c)[0]) for c in range(len(class_names)) if (test.labels == c).any()][:4]
titles = [f"true {class_names[test.labels[k]]} / pred {class_names[pred[k]]}" for k in idx]
show(viz.plot_saliency(test.images[idx], viz.saliency_maps(model, x_test[idx]), OUT / "04_saliency_faces.png",
                       titles=titles))

# %% [markdown]
# ## Activations of the second conv block
#
# `top_activations` runs the network up to a layer (by default the activation after the second
# convolution: for `hw3_cnn` the LeakyReLU at index 6, 64 maps of 24x24) and scores every filter
# on every image by its mean activation. The figure (faces) shows each of the most active
# filters' output on one image, and the images that excite that filter most. Look for what the
# top images of a filter share: an open mouth, raised eyebrows, a head turned to one side?

# %%
pick = np.sort(np.random.default_rng(0).permutation(len(test))[: 100 if QUICK else 600])
act = viz.top_activations(model, x_test[pick], top_k=5, keep_maps=1)
print(f"layer {act.layer_index} {act.layer}: scores {act.scores.shape} (images, filters), maps {act.maps.shape}")
show(viz.plot_activations(test.images[pick], act, OUT / "04_activations_faces.png", n_filters=5))
assert act.scores.shape == (len(pick), 64) and act.top_indices.shape == (64, 5)
dead = int((act.scores.max(axis=0) <= 0).sum())
print(f"{dead} of {act.scores.shape[1]} filters have no positive mean activation on any of these {len(pick)} images")
