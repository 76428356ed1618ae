"""FER-2013 data: loading, preprocessing, augmentation and minibatches.

    >>> from minicnn.data import load_fer2013, stratified_split, Normalizer, Augmenter, iterate_minibatches
    >>> ds = load_fer2013("data/fer2013")              # or fer2013.csv; cached after the first load
    >>> train, val = stratified_split(ds.split("Training"), 0.1, seed=0)
    >>> norm = Normalizer("per_pixel").fit(train.images)
    >>> x, y = norm.transform(train.images), train.labels  # float32 (N, 1, 48, 48), int64 (N,)
    >>> aug = Augmenter(flip=True, rotation=10, seed=0)
    >>> for xb, yb in iterate_minibatches(x, y, 128, rng=np.random.RandomState(0)):
    ...     xb = aug(xb)

Loading needs the optional ``data`` extras (pandas for CSV, Pillow for images):
``pip install -e '.[data]'`` from the minicnn checkout.
"""
from .augment import Augmenter
from .batches import iterate_minibatches
from .fer2013 import CLASS_NAMES, USAGES, DataError, FERDataset, load_fer2013
from .preprocess import SPLIT_METHODS, Normalizer, content_sample, merge_disgust_into_angry, stratified_split, undersample

__all__ = [
    "FERDataset",
    "DataError",
    "load_fer2013",
    "CLASS_NAMES",
    "USAGES",
    "merge_disgust_into_angry",
    "undersample",
    "stratified_split",
    "content_sample",
    "SPLIT_METHODS",
    "Normalizer",
    "Augmenter",
    "iterate_minibatches",
]
