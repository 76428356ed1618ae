"""Optimisers (SGD, Adam, AdamW, RMSprop), gradient clipping and learning-rate schedules.

Update rules and schedules follow ``torch.optim`` exactly; ``tests/test_optim.py``
checks them against PyTorch.
"""
from .optimizers import SGD, Adam, AdamW, Optimizer, RMSprop, clip_grad_norm, make_optimizer
from .schedules import (
    ConstantLR,
    CosineLR,
    ExponentialLR,
    ReduceLROnPlateau,
    Schedule,
    StepLR,
    make_schedule,
)

__all__ = [
    "Optimizer",
    "SGD",
    "Adam",
    "AdamW",
    "RMSprop",
    "clip_grad_norm",
    "make_optimizer",
    "Schedule",
    "ConstantLR",
    "StepLR",
    "ExponentialLR",
    "CosineLR",
    "ReduceLROnPlateau",
    "make_schedule",
]
