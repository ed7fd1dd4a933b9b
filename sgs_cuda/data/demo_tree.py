"""A small generated ImageNet-layout tree of real JPEG files, for trying the ImageNet pipeline on a CPU.

    python -m sgs_cuda.data.demo_tree DIR        # or: sgs-dgdd make-demo-imagenet DIR

writes, for the 10 ImageNette classes (``n01440764`` ... as wnids)::

    DIR/imagenet/train/<wnid>/<wnid>_<i>.JPEG          photos in two lighting styles (bright; dim, vignetted)
    DIR/imagenet/val/<wnid>/ILSVRC2012_val_<n>.JPEG    photos
    DIR/imagenet-sketch/sketch/<wnid>/sketch_<i>.JPEG  grey pencil drawings (the download's wrapping folder)
    DIR/imagenet-r/imagenet-r/<wnid>/art_<i>.jpg       posterised, colour-shifted renditions; one class absent
    DIR/imagenet-v2/imagenetv2-matched-frequency-format-val/<i>/<k>.jpeg   class-index folders (0..999)

plus one corrupt (truncated) training JPEG. A class is a colour and a stripe orientation; the
sketches keep only the stripes (no colour), so OOD accuracy drops below in-domain accuracy as
on the real sets. The tree is written in a temporary folder and renamed into place, so an
interrupted run leaves nothing half-made; an existing demo tree is reused as it is.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

MARKER = ".sgs-demo-imagenet.json"
V2_FOLDER = "imagenetv2-matched-frequency-format-val"


def _pattern(c: int, size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class ``c``'s stripes (``[h, w]`` in [0, 1]) and colour (``[3]`` in [0, 1])."""
    w, h = size
    angle = np.pi * c / 10 + rng.normal(0, 0.05)
    period = 6.0 + (c % 3) * 0.75  # short: outside the pseudo-domains' low-frequency window
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
    hue = c / 10
    colour = 0.5 + 0.4 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
    return stripes, colour


def _image(c: int, style: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A uint8 ``[h, w, 3]`` image of class ``c`` in ``style`` (photo, dim, sketch, art)."""
    stripes, colour = _pattern(c, size, rng)
    if style == "sketch":  # pencil strokes where the stripes change: colour gone
        gy, gx = np.gradient(stripes)
        edges = np.clip(np.hypot(gx, gy) * 4.0, 0, 1)
        grey = 0.95 - 0.8 * edges + rng.normal(0, 0.03, edges.shape)
        px = np.repeat(grey[..., None], 3, axis=2)
    else:
        px = (0.35 + 0.65 * stripes[..., None]) * colour[None, None, :]
        if style == "dim":  # darker, with a vignette: a low-frequency style the pseudo-domains pick up
            h, w = stripes.shape
            yy, xx = np.mgrid[0:h, 0:w] / np.array([h - 1, w - 1]).reshape(2, 1, 1)
            vignette = 1 - 2.4 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
            px = (0.45 * px + 0.05) * vignette[..., None]
        elif style == "art":  # posterised, hue rotated a little, saturated
            px = np.round(np.roll(px, 1, axis=2) * 0.3 + px * 0.7, 1) ** 0.7
        px = px + rng.normal(0, 0.04, px.shape)
    return (np.clip(px, 0, 1) * 255).astype(np.uint8)


def _save(path: Path, px: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(px).save(path, format="JPEG", quality=92)


def demo_paths(root) -> dict[str, Path]:
    """The roots to hand to the loader: ``root`` (ImageNet), ``sketch_root``, ``r_root``, ``v2_root``."""
    root = Path(root)
    return {"root": root / "imagenet", "sketch_root": root / "imagenet-sketch", "r_root": root / "imagenet-r",
            "v2_root": root / "imagenet-v2"}


def demo_command(root, preset: str = "imagenette-cpu") -> str:
    """The ``sgs-dgdd run`` command line for a demo tree at ``root``."""
    p = demo_paths(root)
    return (f"sgs-dgdd run --preset {preset} --data-root {p['root']} --sketch-root {p['sketch_root']} "
            f"--imagenet-r-root {p['r_root']} --imagenet-v2-root {p['v2_root']}")


def make_demo_imagenet(root, train_per_class: int = 12, val_per_class: int = 4, target_per_class: int = 4,
                       seed: int = 0) -> dict:
    """Write the demo tree at ``root`` (a new or empty folder; an existing demo tree is kept).

    Returns ``{"paths": demo_paths(root), "classes": wnids, "missing_from_r": [wnid],
    "corrupt": [path], "files": count, "created": bool}``.
    """
    from .imagenet import imagenet1k_wnids, subset_wnids

    for name, n in (("train_per_class", train_per_class), ("val_per_class", val_per_class),
                    ("target_per_class", target_per_class)):
        if int(n) < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    if train_per_class < 2:
        raise ValueError("train_per_class must be >= 2 (one image per lighting style)")
    root = Path(root).expanduser()
    settings = {"train_per_class": train_per_class, "val_per_class": val_per_class,
                "target_per_class": target_per_class, "seed": seed}
    marker = root / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("settings") != settings:
            raise ValueError(f"{root} holds a demo tree made with other settings {info.get('settings')}: "
                             "delete it or choose another folder")
        return {**info, "paths": demo_paths(root), "created": False}
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty folder: give a new folder for the demo tree")

    wnids = subset_wnids("imagenette")
    index = {w: i for i, w in enumerate(imagenet1k_wnids())}
    missing_from_r = [wnids[3]]
    rng = np.random.default_rng(seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        files, val_number = 0, 0
        shapes = [(48, 40), (40, 48), (44, 44)]  # landscape, portrait, square: the centre crop matters
        for c, w in enumerate(wnids):
            for i in range(train_per_class):
                style = "photo" if i % 2 == 0 else "dim"
                _save(tmp / "imagenet" / "train" / w / f"{w}_{i}.JPEG", _image(c, style, shapes[i % 3], rng))
            for i in range(val_per_class):
                val_number += 1
                _save(tmp / "imagenet" / "val" / w / f"ILSVRC2012_val_{val_number:08d}.JPEG",
                      _image(c, "photo", shapes[i % 3], rng))
            for i in range(target_per_class):
                shape = shapes[i % 3]
                _save(tmp / "imagenet-sketch" / "sketch" / w / f"sketch_{i}.JPEG", _image(c, "sketch", shape, rng))
                if w not in missing_from_r:
                    _save(tmp / "imagenet-r" / "imagenet-r" / w / f"art_{i}.jpg", _image(c, "art", shape, rng))
                _save(tmp / "imagenet-v2" / V2_FOLDER / str(index[w]) / f"{i}.jpeg", _image(c, "photo", shape, rng))
            files += train_per_class + val_per_class + target_per_class * (3 - (w in missing_from_r))
        corrupt = tmp / "imagenet" / "train" / wnids[0] / f"{wnids[0]}_corrupt.JPEG"
        good = (tmp / "imagenet" / "train" / wnids[0] / f"{wnids[0]}_0.JPEG").read_bytes()
        corrupt.write_bytes(good[: len(good) // 3])  # a truncated JPEG: skipped and listed, not a crash
        files += 1
        info = {"settings": settings, "classes": wnids, "missing_from_r": missing_from_r,
                "corrupt": [str(root / corrupt.relative_to(tmp))], "files": files}
        (tmp / MARKER).write_text(json.dumps(info, indent=1))
        if root.exists():
            root.rmdir()  # empty (checked above)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "paths": demo_paths(root), "created": True}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgs_cuda.data.demo_tree", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="a new (or empty) folder")
    parser.add_argument("--train-per-class", type=int, default=12)
    args = parser.parse_args(argv)
    try:
        info = make_demo_imagenet(args.dir, train_per_class=args.train_per_class)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(info, args.dir))
    return 0


def describe(info: dict, root) -> str:
    """What was written and the command that runs the CPU preset on it."""
    what = "wrote" if info["created"] else "found the demo tree at"
    return (f"{what} {root}: {info['files']} JPEG files, {len(info['classes'])} classes; imagenet-r lacks "
            f"{', '.join(info['missing_from_r'])}; corrupt on purpose: {info['corrupt'][0]}\n"
            f"run:\n  {demo_command(root)}")


if __name__ == "__main__":
    sys.exit(main())
