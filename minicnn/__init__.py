"""minicnn: a from-scratch, autograd-free CNN library in NumPy that runs on the GPU through CuPy.

Every layer writes out its forward and backward pass; see ``minicnn.layers``.
``minicnn.reference`` computes the same things plainly (loops, or one line of
NumPy that reads like the formula), for study and as the tests' oracle;
``docs/conventions.md`` compares minicnn's conventions with PyTorch's, Keras'
and CS231n's, and ``tutorials/`` walks through the library.
"""
from . import backend, initializers, losses, reference
from .backend import (
    get_array_module,
    get_backend,
    get_default_dtype,
    get_xp,
    seed,
    set_backend,
    set_default_dtype,
    to_device,
    to_host,
)
from .checkpoint import CheckpointError
from .classifier import ImageClassifier, load, pretrained
from .gradcheck import GradCheckReport, gradcheck, numerical_gradient
from .layers import (
    AvgPool2D,
    BatchNorm1D,
    BatchNorm2D,
    Container,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool2D,
    Layer,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    ResidualBlock,
    col2im,
    conv2d_naive,
    im2col,
    recalibrate_batchnorm,
    set_conv_algorithm,
)
from .losses import MSELoss, SoftmaxCrossEntropy, softmax
from .models import MODELS, Sequential, build_model

__version__ = "0.1.0"

__all__ = [
    "backend", "initializers", "losses", "reference",
    "set_backend", "get_backend", "get_xp", "get_array_module", "to_device", "to_host", "seed",
    "set_default_dtype", "get_default_dtype",
    "Layer", "Container", "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "BatchNorm1D", "BatchNorm2D",
    "ReLU", "LeakyReLU", "Dropout", "Dense", "Flatten", "ResidualBlock", "im2col", "col2im", "conv2d_naive",
    "recalibrate_batchnorm", "set_conv_algorithm",
    "SoftmaxCrossEntropy", "MSELoss", "softmax",
    "Sequential", "build_model", "MODELS",
    "gradcheck", "numerical_gradient", "GradCheckReport", "CheckpointError",
    "ImageClassifier", "load", "pretrained",
]
