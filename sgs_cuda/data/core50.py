"""CORe50 (Lomonaco & Maltoni, 2017) as a domain-generalisation benchmark: the 11 acquisition
sessions (backgrounds and lighting) are the domains.

Files: the official ``core50_128x128.zip`` unpacks to ``core50_128x128/s1 ... s11/o1 ... o50/*.png``
(300 frames per object and session). Classes are the 10 categories (objects ``o1-o5`` plug
adapters, ``o6-o10`` mobile phones ... ``o46-o50`` remote controls), or the 50 objects with
``level="object"`` (``--data-option level=object``). Each (session, class) cell is split into
train/test as image folders are (:class:`~sgs_cuda.data.folder.ImageFolderDomains`), decoded once
into the cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDomains, _image_files

SESSIONS = tuple(f"s{i}" for i in range(1, 12))
CATEGORIES = ("plug_adapter", "mobile_phone", "scissors", "light_bulb", "can", "glasses", "ball", "marker",
              "cup", "remote_control")
OBJECTS = tuple(f"o{i}" for i in range(1, 51))
# Named target sets for leave-domains-out (``--target outdoor``). The outdoor sessions as we read the
# CORe50 paper (8 indoor, 3 outdoor sessions): check against it before reporting on them.
OUTDOOR = ("s4", "s8", "s11")
TARGET_GROUPS = {"outdoor": OUTDOOR, "indoor": tuple(s for s in SESSIONS if s not in OUTDOOR),
                 "test-sessions": ("s3", "s7", "s10")}  # the sessions CORe50's own benchmarks test on


class CORe50(ImageFolderDomains):
    """CORe50 sessions as domains.

    Args:
        root: ``core50_128x128`` or the folder holding it.
        sessions: the sessions to use, in this order (default all 11).
        level: ``"category"`` (10 classes, default) or ``"object"`` (50), as CORe50 names its two tasks.
        resolution: square side (64), test_fraction, seed, mean, std, cache_dir, num_workers,
            progress: as for :class:`~sgs_cuda.data.folder.ImageFolderDomains`.

    ``target_groups``: ``outdoor``, ``indoor`` and ``test-sessions``, usable as ``--target``.
    """
    target_groups = TARGET_GROUPS

    def __init__(self, root, sessions: Sequence[str] = SESSIONS, level: str = "category",
                 resolution: int = 64, test_fraction: float = 0.2, seed: int = 0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 cache_dir=None, num_workers: int | None = None, progress: bool = True):
        if level not in ("category", "object"):
            raise ValueError(f"CORe50 level must be 'category' or 'object', got {level!r}")
        root = Path(root).expanduser()
        if (root / "core50_128x128").is_dir():
            root = root / "core50_128x128"
        if root.is_dir() and not any((root / s).is_dir() for s in sessions):
            raise FileNotFoundError(f"no CORe50 session folder ({', '.join(sessions)}) in {root}: expected "
                                    "core50_128x128/s1 ... s11/o1 ... o50/*.png (the folder or its parent)")
        self._objects = level == "object"
        super().__init__(root, domains=list(sessions), classes=OBJECTS if self._objects else CATEGORIES,
                         resolution=resolution, test_fraction=test_fraction, seed=seed, mean=mean, std=std,
                         crop="squash", cache_dir=cache_dir, num_workers=num_workers, progress=progress)

    def _class_files(self, domain_dir: Path, folders: list[str], cls: str) -> list[Path]:
        # a category is the union of its five object folders
        objects = [cls] if self._objects else list(OBJECTS[5 * CATEGORIES.index(cls):][:5])
        return [f for o in objects if o in folders for f in _image_files(domain_dir / o)]
