"""The ConvNet of the dataset-distillation literature (DC/DSA/DM reference implementation).

``depth`` blocks of conv3x3 -> norm -> ReLU -> 2x2 average pooling, then a linear classifier on
the flattened feature map. ``embed`` returns those flattened features: DM matches their
class means. "instancenorm" is ``GroupNorm(width, width, affine=True)`` as in the reference
(one group per channel = instance norm with a learnable affine).

``depth="auto"`` follows the resolution as the literature does (ConvNetD3 at 32 px, D4 at 64,
D5 at 128, D6 at 256: the last feature map is 4x4). :meth:`ConvNet.set_compute` makes ``embed``
run under bfloat16 autocast and/or in channels_last memory layout (GPU speed-ups); its output
stays float32, so what is computed from the features (DM's means, the losses, the gradients of
float32 inputs) stays float32.
"""
from __future__ import annotations

import math

import torch
from torch import nn

NORMS = ("instancenorm", "batchnorm", "none")
COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def _first_padding(h: int, w: int) -> int:
    return 3 if (h, w) == (28, 28) else 1


def auto_depth(image_shape) -> int:
    """The ConvNet depth for ``image_shape = (C, H, W)``: 3 at 32 px (and 28, padded to 32), 4 at
    64, 5 at 128, 6 at 256 (``floor(log2(min(H, W))) - 2``, at least 1)."""
    h, w = (int(s) for s in image_shape[1:])
    pad = _first_padding(h, w)
    side = min(h, w) + 2 * pad - 2
    return max(1, side.bit_length() - 1 - 2)


def resolve_depth(depth, image_shape) -> int:
    """``depth`` as an int (``"auto"``: :func:`auto_depth`)."""
    if depth == "auto":
        return auto_depth(image_shape)
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ValueError(f"depth must be a positive integer or 'auto', got {depth!r}")
    return depth


def _norm_layer(norm: str, width: int) -> nn.Module:
    if norm == "instancenorm":
        return nn.GroupNorm(width, width, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(width)
    return nn.Identity()


class ConvNet(nn.Module):
    """ConvNet-``depth`` for ``image_shape = (C, H, W)`` inputs and ``num_classes`` outputs.

    28x28 inputs get a padding of 3 in the first convolution (the feature map becomes 32x32, as
    the reference does for MNIST-sized images), so 28/32/64/128 inputs all pool cleanly.
    """

    def __init__(self, image_shape, num_classes: int, width: int = 128, depth: int | str = 3,
                 norm: str = "instancenorm"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        depth = resolve_depth(depth, image_shape)
        if depth < 1 or width < 1 or num_classes < 1:
            raise ValueError(f"depth, width and num_classes must be >= 1, got {depth}, {width}, {num_classes}")
        channels, h, w = (int(s) for s in image_shape)
        first_pad = _first_padding(h, w)
        h, w = h + 2 * first_pad - 2, w + 2 * first_pad - 2
        if min(h, w) < 2 ** depth:
            raise ValueError(f"image size {tuple(image_shape[1:])} is too small for {depth} pooling layers")
        layers: list[nn.Module] = []
        for d in range(depth):
            layers += [nn.Conv2d(channels if d == 0 else width, width, 3, padding=first_pad if d == 0 else 1),
                       _norm_layer(norm, width), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_features = width * h * w
        self.classifier = nn.Linear(self.num_features, num_classes)
        self.depth = depth
        self.compute_dtype: torch.dtype | None = None  # None: the parameters' dtype (no autocast)
        self.channels_last = False

    def set_compute(self, precision: str = "float32", channels_last: bool = False) -> "ConvNet":
        """How :meth:`embed` computes: ``precision="bfloat16"`` runs the features under bfloat16
        autocast (convolutions in bfloat16, norms in float32, features returned as float32);
        ``channels_last`` stores the parameters and the inputs in NHWC layout."""
        if precision not in COMPUTE_DTYPES:
            raise ValueError(f"precision must be one of {tuple(COMPUTE_DTYPES)}, got {precision!r}")
        self.compute_dtype = COMPUTE_DTYPES[precision]
        if bool(channels_last) != self.channels_last:
            self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.channels_last = bool(channels_last)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the classifier, ``[n, num_features]``."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compute_dtype is None:
            return self.features(x).flatten(1)
        with torch.autocast(x.device.type, dtype=self.compute_dtype):
            features = self.features(x)
        return features.flatten(1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))

    @torch.no_grad()
    def reinitialize(self, generator: torch.Generator | None = None) -> "ConvNet":
        """Draw fresh parameters in place, with torch's default layer initialisation
        (uniform(+-1/sqrt(fan_in)) for weights and biases; norms at weight 1, bias 0).

        Drawing from an explicit ``generator`` keeps the distillation loop's randomness in
        streams it owns, so checkpoints can restore it and DM and DM+SGS see the same nets.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bound = 1.0 / math.sqrt(m.weight[0].numel())  # 1/sqrt(fan_in)
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.copy_(torch.rand(p.shape, generator=generator, device=_gen_device(generator, p))
                                .to(p.device).mul_(2 * bound).sub_(bound))
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_running_stats()
        return self


def _gen_device(generator: torch.Generator | None, p: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else p.device


def build_convnet(image_shape, num_classes: int, width: int = 128, depth: int | str = 3, norm: str = "instancenorm",
                  generator: torch.Generator | None = None, device="cpu") -> ConvNet:
    """A ConvNet on ``device`` initialised from ``generator`` (reproducible without touching the
    global RNG)."""
    return ConvNet(image_shape, num_classes, width, depth, norm).to(device).reinitialize(generator)
