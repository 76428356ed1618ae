"""All layers: each one a small class with ``forward(x, training)`` and ``backward(dout)``."""
from .activations import Dropout, LeakyReLU, ReLU
from .base import Container, Layer
from .conv import Conv2D, col2im, conv2d_naive, im2col, set_conv_algorithm
from .dense import Dense, Flatten
from .normalization import BatchNorm1D, BatchNorm2D, batchnorm_layers, recalibrate_batchnorm
from .pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from .residual import ResidualBlock

__all__ = [
    "Layer", "Container", "Conv2D", "im2col", "col2im", "conv2d_naive", "MaxPool2D", "AvgPool2D",
    "GlobalAvgPool2D", "BatchNorm1D", "BatchNorm2D", "ReLU", "LeakyReLU", "Dropout", "Dense", "Flatten",
    "ResidualBlock", "batchnorm_layers", "recalibrate_batchnorm", "set_conv_algorithm",
]
