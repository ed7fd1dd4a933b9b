"""Evaluation networks other than the distillation ConvNet: small-image AlexNet, VGG-11 and
ResNet-18 (the cross-architecture protocol of the DC/DSA/DM papers), each with a ``width`` knob
and batch, instance or no normalisation.

``width`` is the channel count of the first stage; the later stages keep the reference ratios:

- ``alexnet``: 5 convolutions (5x5, 5x5, 3x3, 3x3, 3x3) with ``width x (1, 1.5, 2, 1.5, 1.5)``
  channels and 3 max pools (reference width 128: 128-192-256-192-192).
- ``vgg11``: the VGG-11 configuration ``w, M, 2w, M, 4w, 4w, M, 8w, 8w, M, 8w, 8w, M`` of 3x3
  convolutions (reference width 64), one linear classifier on the flattened map.
- ``resnet18``: the CIFAR ResNet-18 (3x3 stem, no stem pooling, 4 stages of 2 basic blocks with
  ``w, 2w, 4w, 8w`` channels, global average pooling; reference width 64).

28x28 inputs get a first-layer padding that brings the map to 32x32 (as the ConvNet does), so
28/32/64 inputs all pool cleanly. ``instancenorm`` is ``GroupNorm(c, c)`` with an affine, as in
the ConvNet. Every network draws its parameters from an explicit generator (``reinitialize``).
"""
from __future__ import annotations

import torch
from torch import nn

from .networks import NORMS, ConvNet, _norm_layer, build_convnet

ARCHITECTURES = ("convnet", "alexnet", "vgg11", "resnet18")
# Reference widths (the papers' networks) and the reduced widths we use for CPU studies.
REFERENCE_WIDTHS = {"convnet": 128, "alexnet": 128, "vgg11": 64, "resnet18": 64}
CPU_WIDTHS = {"convnet": 32, "alexnet": 32, "vgg11": 16, "resnet18": 16}


class _SmallNet(nn.Module):
    """Shared pieces: ``embed`` (features before the classifier), ``forward``, ``reinitialize``."""
    features: nn.Module
    classifier: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))

    reinitialize = ConvNet.reinitialize  # torch's default layer initialisation, from a generator


def _check(image_shape, num_classes: int, width: int, norm: str):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if width < 1 or num_classes < 1:
        raise ValueError(f"width and num_classes must be >= 1, got {width}, {num_classes}")
    c, h, w = (int(s) for s in image_shape)
    pad = 2 if (h, w) == (28, 28) else 0  # extra first-layer padding: 28 -> 32
    return c, h + 2 * pad, w + 2 * pad, pad


def _too_small(image_shape, name: str, pools: int):
    return ValueError(f"image size {tuple(image_shape[1:])} is too small for {name} ({pools} 2x2 poolings)")


class AlexNet(_SmallNet):
    def __init__(self, image_shape, num_classes: int, width: int = 128, norm: str = "instancenorm"):
        super().__init__()
        c, h, w, pad = _check(image_shape, num_classes, width, norm)
        if min(h, w) < 8:
            raise _too_small(image_shape, "alexnet", 3)
        ch = [width, width * 3 // 2, width * 2, width * 3 // 2, width * 3 // 2]
        layers: list[nn.Module] = []
        for i, (k, out) in enumerate(zip((5, 5, 3, 3, 3), ch)):
            layers += [nn.Conv2d(c if i == 0 else ch[i - 1], out, k, padding=k // 2 + (pad if i == 0 else 0)),
                       _norm_layer(norm, out), nn.ReLU(inplace=True)]
            if i in (0, 1, 4):
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.num_features = ch[-1] * (h // 8) * (w // 8)
        self.classifier = nn.Linear(self.num_features, num_classes)


VGG11 = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")


class VGG(_SmallNet):
    def __init__(self, image_shape, num_classes: int, width: int = 64, norm: str = "instancenorm",
                 config=VGG11):
        super().__init__()
        c, h, w, pad = _check(image_shape, num_classes, width, norm)
        pools = config.count("M")
        if min(h, w) < 2 ** pools:
            raise _too_small(image_shape, "vgg11", pools)
        layers: list[nn.Module] = []
        first = True
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
                continue
            out = width * v
            layers += [nn.Conv2d(c, out, 3, padding=1 + (pad if first else 0)), _norm_layer(norm, out),
                       nn.ReLU(inplace=True)]
            c, first = out, False
        self.features = nn.Sequential(*layers)
        self.num_features = c * h * w
        self.classifier = nn.Linear(self.num_features, num_classes)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm_layer(norm, cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), _norm_layer(norm, cout))

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(_SmallNet):
    def __init__(self, image_shape, num_classes: int, width: int = 64, norm: str = "instancenorm"):
        super().__init__()
        c, h, w, pad = _check(image_shape, num_classes, width, norm)
        if min(h, w) < 8:
            raise _too_small(image_shape, "resnet18", 3)
        layers: list[nn.Module] = [nn.Conv2d(c, width, 3, 1, 1 + pad, bias=False), _norm_layer(norm, width),
                                   nn.ReLU(inplace=True)]
        cin = width
        for stage, mult in enumerate((1, 2, 4, 8)):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(cin, width * mult, stride, norm))
                cin = width * mult
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.num_features = cin
        self.classifier = nn.Linear(cin, num_classes)


def build_network(arch: str, image_shape, num_classes: int, width: int | None = None, depth: int = 3,
                  norm: str = "instancenorm", generator: torch.Generator | None = None, device="cpu") -> nn.Module:
    """A network of ``arch`` (``ARCHITECTURES``) on ``device``, initialised from ``generator``.

    ``width``: channels of the first stage (``None``: the reference width); ``depth`` only
    applies to the ConvNet.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    width = REFERENCE_WIDTHS[arch] if width is None else int(width)
    if arch == "convnet":
        return build_convnet(image_shape, num_classes, width, depth, norm, generator=generator, device=device)
    cls = {"alexnet": AlexNet, "vgg11": VGG, "resnet18": ResNet18}[arch]
    return cls(image_shape, num_classes, width, norm).to(device).reinitialize(generator)


def parse_archs(spec: str) -> list[tuple[str, int | None]]:
    """``"convnet,vgg11:16"`` -> ``[("convnet", None), ("vgg11", 16)]``: architectures to train,
    each with an optional width (``None``: the evaluation config's width)."""
    out = []
    for item in str(spec).split(","):
        name, _, width = item.strip().partition(":")
        if name not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {name!r} in {spec!r}; choose from {ARCHITECTURES} "
                             "(optionally name:width, comma-separated)")
        try:
            w = int(width) if width else None
        except ValueError:
            raise ValueError(f"width of {name!r} in {spec!r} must be an integer, got {width!r}") from None
        if w is not None and w < 1:
            raise ValueError(f"width of {name!r} in {spec!r} must be >= 1, got {w}")
        out.append((name, w))
    if len({n for n, _ in out}) != len(out):
        raise ValueError(f"architecture listed twice in {spec!r}")
    return out
