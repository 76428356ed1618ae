"""Models: the :class:`Sequential` container and the zoo of report networks."""
from .sequential import Sequential
from .zoo import MODELS, amth667_cnn, build_model, dlcv_cnn, ece662_resnet, hw3_cnn, hw3_dnn, trd_cnn, vgg_fer, vgg_fer_slim

__all__ = ["Sequential", "MODELS", "build_model", "hw3_cnn", "hw3_dnn", "trd_cnn", "ece662_resnet", "amth667_cnn", "dlcv_cnn", "vgg_fer", "vgg_fer_slim"]
