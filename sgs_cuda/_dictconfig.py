"""Dict round-trips of the pipeline's config dataclasses (run folders store them as JSON)."""
from __future__ import annotations

import dataclasses


class DictConfig:
    """``to_dict``/``from_dict`` for a dataclass; ``from_dict`` names unknown keys.
    ``_kind`` says what the options are for in that error message."""
    _kind = "config"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls._kind} option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
