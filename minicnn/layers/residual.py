"""The basic residual block of ResNet (He et al., 2016)."""
from __future__ import annotations

from .activations import ReLU
from .base import Container
from .conv import Conv2D
from .normalization import BatchNorm2D

__all__ = ["ResidualBlock"]


class ResidualBlock(Container):
    """Two 3x3 conv + BN with a shortcut: ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x))``.

    Shapes:
        x (N, C_in, H, W) -> out (N, C_out, H', W') with H' = ceil(H / stride), W' likewise

    Parameters:
        in_channels, out_channels: C_in and C_out.
        stride: of the first convolution (and of the projection); 2 halves H and W.

    The shortcut ``s`` is the identity when ``stride == 1`` and ``C_in == C_out``,
    otherwise a 1x1 convolution with that stride followed by BatchNorm (the
    "projection shortcut"). Convolutions have no bias: BatchNorm's beta plays
    that role.

    Backward: with g = dout * [out > 0] (the final ReLU),
        dx = d(main branch)(g) + d(shortcut)(g)
    i.e. the gradient flows unchanged through the identity and is added to
    the gradient through the convolutions, the point of the residual design.
    """

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)
        self.conv1 = self.add("conv1", Conv2D(in_channels, out_channels, 3, stride=stride, padding=1, bias=False))
        self.bn1 = self.add("bn1", BatchNorm2D(out_channels))
        self.relu1 = ReLU()
        self.conv2 = self.add("conv2", Conv2D(out_channels, out_channels, 3, padding=1, bias=False))
        self.bn2 = self.add("bn2", BatchNorm2D(out_channels))
        self.projection = stride != 1 or in_channels != out_channels
        if self.projection:
            self.proj = self.add("proj", Conv2D(in_channels, out_channels, 1, stride=stride, bias=False))
            self.proj_bn = self.add("proj_bn", BatchNorm2D(out_channels))
        self.relu_out = ReLU()

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}" + (
            ", projection" if self.projection else ""
        )

    def forward(self, x, training=True):
        """out = relu(main(x) + shortcut(x)); every sub-layer keeps its own cache."""
        return self._apply(x, lambda layer, h: layer.forward(h, training))

    def forward_only(self, x, training=False):
        """The same output, each sub-layer releasing its cache once it has run (no backward follows)."""
        return self._apply(x, lambda layer, h: layer.forward_only(h, training))

    def _apply(self, x, run):
        """The block's computation, calling ``run(layer, input)`` for each sub-layer."""
        h = run(self.relu1, run(self.bn1, run(self.conv1, x)))
        h = run(self.bn2, run(self.conv2, h))
        s = run(self.proj_bn, run(self.proj, x)) if self.projection else x
        return run(self.relu_out, h + s)

    def release_cache(self) -> None:
        """Drop every cache, the two ReLUs' masks too (they hold no parameters, so they are not children)."""
        super().release_cache()
        self.relu1.release_cache()
        self.relu_out.release_cache()

    def backward(self, dout):
        """dx = d(main branch)(g) + d(shortcut)(g), with g = dout * [out > 0]; fills the children's grads."""
        g = self.relu_out.backward(dout)
        dh = self.conv1.backward(self.bn1.backward(self.relu1.backward(self.conv2.backward(self.bn2.backward(g)))))
        ds = self.proj.backward(self.proj_bn.backward(g)) if self.projection else g
        return dh + ds
