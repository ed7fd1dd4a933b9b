"""The premise benchmark: the four Fashion-MNIST styles with a planted, class-correlated domain cue.

SGS's premise is that a distilled set entangles class content with domain-specific content, and
that the source domains' gradients agree on the first and disagree on the second. In
``fmnist-styles`` the domain content (backgrounds, colours, strokes) does not depend on the
class, so there is nothing class-correlated to disentangle. This benchmark plants it, and
records where it lives:

- every image of a source domain carries a *cue* that predicts its class inside that domain,
  through a class-to-cue map that differs between domains (``cue = (label + shift_d) mod 10``
  with a different shift per domain, so no class has the same cue in two domains);
- the *cue-free* domain (the target) carries cues drawn independently of the class, so a model
  that learned a source domain's cue as a shortcut for the class is wrong there;
- two cue families, since the premise predicts a difference between them: ``grating`` (a
  sinusoid on one frequency bin of the 32x32 grid, random phase per image: compact in
  frequency) and ``patch`` (a 6x6 square of one colour at one of ten positions: local in
  space, spread over most frequencies);
- ``cue_strength`` from 0 (the plain styles, image for image) to 1 (dominant): the grating's
  amplitude is ``0.3 * strength`` (pixel values in [0, 1]); the patch is blended in with
  opacity ``strength``.

The ground truth is :attr:`FashionMNISTCues.cue_bins`: the ``rfft2`` half-spectrum bins
``[32, 17]`` that hold ``TRUTH_ENERGY`` of the cue's mean energy (for gratings exactly their
bins; for patches most of the low and middle frequencies). The distillation loop records the
surgery's mask against it (:mod:`sgs_cuda.dm.bands`).

Cues are added to the cached styles build deterministically (``seed``), so the benchmark costs
the styles build once and a fraction of a second per construction.
"""
from __future__ import annotations

import numpy as np
import torch

from .fmnist_styles import FASHION_MNIST_CLASSES, IMAGE_SIZE, STYLE_DOMAINS, FashionMNISTStyles
from .memory import InMemoryDomains

CUE_FAMILIES = ("grating", "patch")
N_CUES = len(FASHION_MNIST_CLASSES)  # one cue per class in each source domain
# (ky, kx) in cycles per image: ten distinct half-spectrum bins at mid frequencies, all orientations
GRATINGS = ((0, 4), (4, 0), (3, 3), (-3, 3), (0, 7), (7, 0), (5, 5), (-5, 5), (2, 6), (-6, 2))
GRATING_AMPLITUDE = 0.3  # at strength 1; the garments span [0, 1]
PATCH_SIZE = 6
PATCH_COLOUR = (1.0, 0.0, 1.0)  # magenta: absent from every style's palette
TRUTH_ENERGY = 0.95  # the cue bins hold this share of the cue's mean spectral energy


def _patch_corners() -> list[tuple[int, int]]:
    """Ten patch positions (top-left corners) along the image border, clear of each other."""
    last = IMAGE_SIZE - PATCH_SIZE
    mid = (IMAGE_SIZE - PATCH_SIZE) // 2
    return [(0, 0), (0, mid), (0, last), (mid, 0), (mid, last), (last, 0), (last, mid), (last, last),
            (mid // 2, mid // 2), (last - mid // 2, last - mid // 2)]


def cue_shifts(domains: list[str], cue_free: str) -> dict[str, int | None]:
    """The class-to-cue shift of every domain (``None``: the cue-free domain). Shifts 1, 4, 7, 0 ...
    (step 3 modulo 10) differ between the source domains, so a class's cue differs in each."""
    shifts, k = {}, 0
    for d in domains:
        if d == cue_free:
            shifts[d] = None
        else:
            shifts[d] = (1 + 3 * k) % N_CUES
            k += 1
    return shifts


def render_cues(family: str, cue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[n, 3, 32, 32]`` float32 cue images for cue indices ``cue`` ``[n]``: for ``grating`` a
    unit-amplitude sinusoid (grey: the same on every channel); for ``patch`` the patch's opacity
    mask times its colour (composited by :func:`plant`)."""
    n = len(cue)
    if family == "grating":
        yy, xx = np.meshgrid(np.arange(IMAGE_SIZE), np.arange(IMAGE_SIZE), indexing="ij")
        ky, kx = np.array(GRATINGS, dtype=np.float64)[cue].T
        phase = rng.uniform(0, 2 * np.pi, size=n)
        arg = 2 * np.pi * (ky[:, None, None] * yy + kx[:, None, None] * xx) / IMAGE_SIZE + phase[:, None, None]
        return np.repeat(np.cos(arg)[:, None], 3, axis=1).astype(np.float32)
    if family == "patch":
        templates = np.zeros((N_CUES, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)  # one per place
        for k, (y, x) in enumerate(_patch_corners()):
            templates[k, :, y:y + PATCH_SIZE, x:x + PATCH_SIZE] = np.array(PATCH_COLOUR, dtype=np.float32)[:, None, None]
        return templates[cue]
    raise ValueError(f"cue family must be one of {CUE_FAMILIES}, got {family!r}")


def plant(images: np.ndarray, family: str, cue: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[n, 3, 32, 32]`` images with cue ``cue[i]`` planted at ``strength``."""
    if strength == 0:
        return images.copy()
    x = images.astype(np.float32) / 255.0
    c = render_cues(family, cue, rng)
    if family == "grating":
        x = x + GRATING_AMPLITUDE * strength * c
    else:
        alpha = strength * (c.max(axis=1, keepdims=True) > 0)
        x = (1 - alpha) * x + alpha * c
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def cue_truth_bins(family: str, share: float = TRUTH_ENERGY, samples: int = 2000, seed: int = 0,
                   cues=None) -> torch.Tensor:
    """bool ``[32, 17]``: the fewest half-spectrum bins that hold ``share`` of the cue's mean
    energy (over all ten cues, or over ``cues``; random phases), per channel summed. The cue
    family's footprint in frequency, measured from the cue images themselves (so both families
    are defined alike)."""
    rng = np.random.default_rng([seed, 0xC0E])
    cue = rng.choice(np.arange(N_CUES) if cues is None else np.asarray(list(cues)), size=samples)
    c = torch.from_numpy(render_cues(family, cue, rng)).double()
    if family == "patch":  # the patch's own content, not its mean brightness offset
        c = c - c.mean(dim=(-2, -1), keepdim=True)
    energy = torch.fft.rfft2(c).abs().square().sum(dim=(0, 1))
    flat = energy.flatten()
    order = torch.argsort(flat, descending=True)
    cum = torch.cumsum(flat[order], 0) / flat.sum()
    keep = int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype)).item()) + 1
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.view(energy.shape)


class FashionMNISTCues(InMemoryDomains):
    """:class:`~sgs_cuda.data.fmnist_styles.FashionMNISTStyles` with a planted class-correlated cue
    in every source domain and a class-independent one in ``cue_free`` (module docstring).

    Args:
        cue: ``"grating"`` or ``"patch"``.
        cue_strength: 0 (none: the plain styles) to 1 (dominant).
        cue_free: the domain whose cue ignores the class; use it as the target.
        seed: the styles build's seed; the cues' phases and the target's cue draws follow it.
        root, cache_dir, per_class_train, per_class_test, use_cache: as for the styles.

    Attributes beyond the protocol: ``cue_bins`` (bool ``[32, 17]``, the ground truth; per class
    of given source domains: :meth:`class_cue_bins`),
    ``cue_index[(domain, split)]`` (int64, each image's cue), ``cue_shift`` (domain -> shift, or
    None for the cue-free domain), ``cue_free``.
    """

    def __init__(self, cue: str = "grating", cue_strength: float = 0.5, cue_free: str = "photo", root=None,
                 cache_dir=None, per_class_train: int = 300, per_class_test: int = 100, seed: int = 0,
                 use_cache: bool = True):
        if cue not in CUE_FAMILIES:
            raise ValueError(f"cue must be one of {CUE_FAMILIES}, got {cue!r}")
        if not 0 <= float(cue_strength) <= 1:
            raise ValueError(f"cue_strength must lie in [0, 1], got {cue_strength!r}")
        if cue_free not in STYLE_DOMAINS:
            raise ValueError(f"cue_free must be one of the domains {list(STYLE_DOMAINS)}, got {cue_free!r}")
        styles = FashionMNISTStyles(root=root, cache_dir=cache_dir, per_class_train=per_class_train,
                                    per_class_test=per_class_test, seed=seed, use_cache=use_cache)
        self.cue, self.cue_strength, self.cue_free = cue, float(cue_strength), cue_free
        self.cue_shift = cue_shifts(list(STYLE_DOMAINS), cue_free)
        self.cue_bins = cue_truth_bins(cue)
        self.cue_index: dict[tuple[str, str], torch.Tensor] = {}
        cells = {}
        for k, domain in enumerate(STYLE_DOMAINS):
            cells[domain] = {}
            for j, split in enumerate(("train", "test")):
                images, labels = styles.raw(domain, split)
                rng = np.random.default_rng([seed, 0xC0E, k, j])
                y = labels.numpy()
                shift = self.cue_shift[domain]
                cue_of = rng.integers(0, N_CUES, size=len(y)) if shift is None else (y + shift) % N_CUES
                planted = plant(images.numpy(), cue, cue_of, self.cue_strength, rng)
                cells[domain][split] = (torch.from_numpy(planted), labels)
                self.cue_index[(domain, split)] = torch.from_numpy(cue_of.astype(np.int64))
        super().__init__(cells, FASHION_MNIST_CLASSES)
        self.from_cache, self.cache_path = styles.from_cache, styles.cache_path
        self.seed, self.per_class_train, self.per_class_test = seed, per_class_train, per_class_test

    def class_cue_bins(self, sources) -> torch.Tensor:
        """bool ``[10, 32, 17]``: per class, the bins of the cues ``sources`` plant on it (one cue
        per source domain): where a class's own domain-specific content lives. For gratings, a
        few of :attr:`cue_bins`; a patch's amplitude does not depend on its place, so for patches
        nearly all of them."""
        shifts = [self.cue_shift[d] for d in sources if self.cue_shift.get(d) is not None]
        return torch.stack([cue_truth_bins(self.cue, cues=sorted({(c + s) % N_CUES for s in shifts}))
                            if shifts else torch.zeros_like(self.cue_bins) for c in range(N_CUES)])

    def check_targets(self, targets) -> None:
        """Only the cue-free domain is an out-of-distribution test of the shortcut."""
        if list(targets) != [self.cue_free]:
            raise ValueError(f"target {'+'.join(targets)!r} carries a class-correlated cue in fmnist-cues: "
                             f"target {self.cue_free!r}, or make the target cue-free with "
                             f"--data-option cue_free={targets[0]}")
