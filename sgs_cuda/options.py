"""The surgery's options: :class:`SGSConfig`, the one place each option is declared, validated and
described. The op (:func:`~sgs_cuda.ops.spectral_gradient_surgery`), the DM-loop helper
(:class:`~sgs_cuda.surgery.SpectralGradientSurgery`), the CLI's "spectral gradient surgery" group
(:func:`add_arguments`) and the study scripts (:meth:`SGSConfig.flags`) all read it; adding an
option is one field here (with its ``help``) and its meaning in the reference
(:func:`~sgs_cuda.reference.sgs_reference`) or in the helper.

Each field's metadata: ``help`` (the CLI's and the docs' one line), ``choices`` (string options),
``scope``: ``"op"`` (the operator reads it), ``"loop"`` (the helper keeps it: the assignment,
the agreement's window and pooling, the space).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple

MASK_MODES = ("hard", "soft")
NORMALIZE_MODES = ("none", "dm_norm", "kept_fraction")
ASSIGNMENTS = ("random", "fixed")
SPACES = ("spectral", "spatial")
POOLS = ("image", "class")
COMBINES = ("mask", "pcgrad")
AGREEMENT_SOURCES = ("dm", "contrast")


def _opt(default, help: str, scope: str = "op", choices: tuple | None = None, unit: bool = False,
         nonneg: bool = False):
    return field(default=default, metadata={"help": help, "scope": scope, "choices": choices, "unit": unit,
                                            "nonneg": nonneg})


class KernelArgs(NamedTuple):
    """The scalar arguments of the compiled ops, packed in one place (:meth:`SGSConfig.kernel_args`).
    ``spec`` is what the fused ``sgs::surgery*`` kernels take (the spec's formulation); the
    general formulations add the rest (``sgs::surgery_general``, the reference)."""
    tau: float
    rho: float
    alpha: float
    beta: float
    mask: str
    mean_weight: float
    decay: float
    equalize: bool
    combine: str

    @property
    def spec(self) -> tuple:
        return self.tau, self.rho, self.alpha, self.beta, self.mask

    @property
    def is_spec(self) -> bool:
        """Whether these are the spec's formulation (what the fused kernels compute)."""
        return self.mean_weight == 1.0 and self.fused

    @property
    def fused(self) -> bool:
        """Whether the fused kernels run these: the spec's formulation with any ``mean_weight``,
        which is linear in the kernels' mean part (applied after them, element-wise)."""
        return self.decay == 0.0 and not self.equalize and self.combine == "mask"


@dataclass(frozen=True)
class SGSConfig:
    """Hyper-parameters of the surgery (defaults: the spec's formulation with the sweep's settings;
    ``docs/RESULTS.md`` says how they were set and what the other formulations measured)."""
    tau: float = _opt(1.0, "sign-agreement threshold in [0, 1] (1: unanimous signs)", unit=True)
    rho: float = _opt(0.0, "magnitude-agreement threshold min|F_d|/max|F_d| in [0, 1] (0: sign agreement only)",
                      unit=True)
    alpha: float = _opt(1.0, "weight of the shared spectrum")
    beta: float = _opt(0.25, "weight of the diversity spectrum")
    mask: str = _opt("hard", "hard: thresholds; soft: agreement x magnitude ratio", choices=MASK_MODES)
    assignment: str = _opt("random", "the domain whose own deviation each image takes: a fresh random one per "
                           "step, or image n -> domain n % D", scope="loop", choices=ASSIGNMENTS)
    space: str = _opt("spectral", "where agreement is measured: per frequency (SGS) or per pixel (ablation)",
                      scope="loop", choices=SPACES)
    normalize: str = _opt("none", "matched step: dm_norm rescales each image's update to its DM gradient's norm; "
                          "kept_fraction divides the shared part by the fraction kept (AND-mask)",
                          choices=NORMALIZE_MODES)
    sign_test: float = _opt(0.0, "agreement against chance: keep a component when a two-sided binomial sign test "
                            "over the D domains rejects 'random signs' at this level (replaces tau; 0: off)",
                            unit=True)
    equalize: bool = _opt(False, "the magnitude test on each domain's spectrum normalised to equal energy "
                          "per plane (matters with rho > 0 or the soft mask)")
    ema: float = _opt(0.0, "agreement over time: the test reads a moving average of each domain's gradient per "
                      "image with this weight on the past (0: this step only; 0.9: about 10 steps)",
                      scope="loop", unit=True)
    agree_on: str = _opt("dm", "what the agreement test reads: the DM loss's domain gradients, or a class-contrast "
                         "gradient per domain (a class pulled toward that domain's class mean and pushed from its "
                         "other class means, in the same network: agreement on class content)", scope="loop",
                         choices=AGREEMENT_SOURCES)
    pool: str = _opt("image", "agreement over a class: the test reads the class mean of each domain's gradient "
                     "(one mask per class) instead of each image's", scope="loop", choices=POOLS)
    combine: str = _opt("mask", "mask: the agreement mask; pcgrad: per-bin projection of conflicting domain "
                        "components (PCGrad per frequency) as the shared part", choices=COMBINES)
    mean_weight: float = _opt(1.0, "weight of the DM gradient in the update (1: the spec's augment; 0 with "
                              "normalize=dm_norm: replace it by shared + beta x diversity at the DM step size)")
    decay: float = _opt(0.0, "removal: + decay x (1 - mask) x each image's own spectrum, so a step shrinks what the "
                        "domains disagree on (0: off)", nonneg=True)
    amp_decay: float = _opt(0.0, "amplitude removal: + amp_decay x the part of each image's amplitude spectrum above "
                            "its class's smallest mean amplitude over the source domains, phase kept (what one "
                            "domain carries and the others lack, a phase-random cue included; 0: off)",
                            scope="loop", nonneg=True)
    spread: float = _opt(0.0, "diversity within the set: - spread x (1 - mask) x (each image's spectrum - its class's "
                         "mean), so a class's images move apart where the domains disagree (0: off)",
                         scope="loop", nonneg=True)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] is not None:
                if value not in meta["choices"]:
                    raise ValueError(f"{f.name} must be one of {meta['choices']}, got {value!r}")
            elif isinstance(f.default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name} must be true or false, got {value!r}")
            else:
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"{f.name} must be a number, got {value!r}") from None
                if meta["unit"] and not 0.0 <= number <= 1.0:
                    raise ValueError(f"{f.name} must lie in [0, 1], got {number}")
                if not math.isfinite(number):
                    raise ValueError(f"{f.name} must be finite, got {number}")
                if meta["nonneg"] and number < 0:
                    raise ValueError(f"{f.name} must be >= 0, got {number}")
                object.__setattr__(self, f.name, number)
        if self.ema == 1.0:
            raise ValueError("ema must be < 1 (1 would never read a new gradient)")
        if self.combine == "pcgrad" and self.space == "spatial":
            raise ValueError("combine='pcgrad' is a per-frequency projection: it needs space='spectral'")
        if self.space == "spatial" and (not self.kernel_args(2).is_spec or self.needs_agreement_tensor or self.spread):
            raise ValueError("the spatial ablation takes the spec's formulation only (mean_weight 1, decay 0, "
                             "equalize off, combine mask, ema 0, pool image, agree_on dm, spread 0)")

    # --- reading it ----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict) -> "SGSConfig":
        """From a saved ``config.json`` section; options added since keep their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown surgery option(s) {unknown}; known: {sorted(names)}")
        return cls(**values)

    def replace(self, **changes) -> "SGSConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def kernel_args(self, num_domains: int) -> KernelArgs:
        """The scalars the kernels take for ``num_domains`` domains (``sign_test`` resolved to the
        smallest sign agreement that is significant at its level)."""
        tau = self.tau if not self.sign_test else sign_test_threshold(num_domains, self.sign_test)
        return KernelArgs(tau, self.rho, self.alpha, self.beta, self.mask, self.mean_weight, self.decay,
                          self.equalize, self.combine)

    def flags(self) -> list[str]:
        """Every option as CLI flags (what a study passes so that it does not move when defaults do)."""
        out = []
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if isinstance(f.default, bool):
                out.append(flag if value else "--no-" + flag[2:])
            else:
                out += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return out

    def differences(self, base: "SGSConfig | None" = None) -> list[str]:
        """``name=value`` for each option that differs from ``base`` (default: the defaults)."""
        base = base or SGSConfig()
        return [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(base, f.name)]

    @property
    def needs_agreement_tensor(self) -> bool:
        """Whether the test reads something other than this step's gradients (kept by the helper)."""
        return self.ema > 0 or self.pool != "image" or self.agree_on != "dm"


def sign_test_threshold(num_domains: int, level: float) -> float:
    """The smallest sign agreement ``a = |sum_d sgn| / D`` whose two-sided binomial p-value (D fair
    coins) is at most ``level``; ``ValueError`` when even unanimity is not significant."""
    D = num_domains
    # P(|2K - D| >= m) for K ~ Binomial(D, 1/2), m = |2k - D|
    tail = {}
    for k in range(D + 1):
        m = abs(2 * k - D)
        tail[m] = sum(math.comb(D, j) for j in range(D + 1) if abs(2 * j - D) >= m) / 2 ** D
    significant = [m for m, p in tail.items() if p <= level + 1e-12]
    if not significant:
        raise ValueError(f"sign_test={level:g}: with D = {D} domains even unanimous signs have p = "
                         f"{tail[D]:.3g}; raise the level or use tau")
    return min(significant) / D


# --- the CLI ----------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    """The CLI's surgery flags, one per field (``--name`` with ``-`` for ``_``), default None (unset)."""
    for f in dataclasses.fields(SGSConfig):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        help = f"{meta['help']} (default {f.default})".replace("%", "%%")  # argparse formats help
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif meta["choices"] is not None:
            parser.add_argument(flag, choices=list(meta["choices"]), help=help)
        else:
            parser.add_argument(flag, type=type(f.default), help=help)


def flag_paths() -> list[tuple[str, str]]:
    """``(argparse attribute, config path)`` of every surgery flag."""
    return [(f.name, f"sgs.{f.name}") for f in dataclasses.fields(SGSConfig)]
