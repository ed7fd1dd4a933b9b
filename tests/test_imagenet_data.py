"""Tests of sgs_cuda.data.imagenet on generated trees of real JPEG/PNG files in the real layouts:
ImageNet train/val, ImageNet-Sketch and -R (wrapped in a folder, R lacking classes), ImageNet-A
(none of the subset's classes), ImageNet-V2 (class-index folders with decoys)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sgs_cuda.data import (ImageNetSubset, MultiDomainDataset, PseudoDomainDataset, denormalize, imagenet1k_wnids,
                           load_dataset, read_wnid_list, sample_domain_batches, subset_wnids)
from sgs_cuda.data import pseudo_domains as pseudo_mod
from sgs_cuda.data.imagenet import MTT_SUBSETS

# The MTT subsets as wnids, checked by hand against the class names in MTT's comments
# (tench ... parachute; Australian terrier ... Old English sheepdog; and so on).
EXPECTED = {
    "imagenette": ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042",
                   "n03425413", "n03445777", "n03888257"],
    "imagewoof": ["n02096294", "n02093754", "n02111889", "n02088364", "n02086240", "n02089973", "n02087394",
                  "n02115641", "n02099601", "n02105641"],
    "imagemeow": ["n02123045", "n02123159", "n02123394", "n02123597", "n02124075", "n02129165", "n02129604",
                  "n02128925", "n02128757", "n02127052"],
    "imagesquawk": ["n01806143", "n02007558", "n01818515", "n02051845", "n02056570", "n01614925", "n01843383",
                    "n01518878", "n01860187", "n01819313"],
    "imagefruit": ["n07753275", "n07753592", "n07745940", "n07747607", "n07749582", "n07768694", "n07753113",
                   "n07720875", "n07718472", "n07742313"],
    "imageyellow": ["n02206856", "n12057211", "n07753592", "n07749582", "n12144580", "n04146614", "n03530642",
                    "n02129165", "n01773157", "n01531178"],
}
NETTE = EXPECTED["imagenette"]
R_LACKS = NETTE[2:5]  # ImageNet-R in the generated tree lacks three of the classes
OTHER = "n01443537"  # goldfish: in ImageNet-1k, not in ImageNette
RES = 16


def colour(c: int) -> np.ndarray:
    return np.array([20 + 23 * c, 230 - 21 * c, 40 + (67 * c) % 180], dtype=np.int64)


def write(path: Path, rgb, seed: int, size=(30, 22)) -> None:
    """A near-solid image of colour ``rgb`` (+-6 noise, so no two files are equal)."""
    rng = np.random.default_rng(seed)
    px = np.clip(np.asarray(rgb)[None, None] + rng.integers(-6, 7, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(px).save(path, quality=95)


def make_imagenet_tree(root: Path) -> dict[str, Path]:
    seed = iter(range(10**6))
    for c, w in enumerate(NETTE):
        for i in range(4):
            size = (30, 22) if i % 2 else (22, 30)
            write(root / "imagenet" / "train" / w / f"{w}_{i}.JPEG", colour(c), next(seed), size)
        for i in range(2):
            write(root / "imagenet" / "val" / w / f"ILSVRC2012_val_{c}{i}.JPEG", colour(c), next(seed))
        write(root / "sketch_dl" / "sketch" / w / f"sketch_{c}.JPEG", colour(c) + 8, next(seed))
        if w not in R_LACKS:
            write(root / "imagenet-r" / "imagenet-r" / w / f"art_{c}.jpg", colour(c) - 8, next(seed))
        write(root / "v2" / str(imagenet1k_wnids().index(w)) / f"{c}.jpeg", colour(c), next(seed))
    write(root / "imagenet" / "train" / OTHER / "x.JPEG", (0, 0, 0), next(seed))  # not in the subset
    write(root / "imagenet-r" / "imagenet-r" / OTHER / "x.jpg", (0, 0, 0), next(seed))
    write(root / "imagenet-a" / OTHER / "x.jpg", (0, 0, 0), next(seed))
    (root / "imagenet-a" / "README.txt").write_text("ImageNet-A")
    for decoy in ("1", "218"):  # V2 folders of other classes: a mapping by folder order would pick these
        write(root / "v2" / decoy / "d.jpeg", (0, 0, 0), next(seed))
    return {"root": root / "imagenet", "sketch_root": root / "sketch_dl", "r_root": root / "imagenet-r",
            "a_root": root / "imagenet-a", "v2_root": root / "v2"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_imagenet_tree(tmp_path_factory.mktemp("inet"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SGS_CACHE_DIR", str(tmp_path / "sgs-cache"))


def load_nette(tree, **kw):
    with pytest.warns(UserWarning) as caught:
        data = load_dataset("imagenette", root=tree["root"], sketch_root=tree["sketch_root"], r_root=tree["r_root"],
                            a_root=tree["a_root"], v2_root=tree["v2_root"], resolution=RES, progress=False, **kw)
    return data, [str(w.message) for w in caught]


def nearest_class(images: torch.Tensor, data) -> list[int]:
    rgb = denormalize(images, data.mean, data.std).mean(dim=(2, 3)) * 255
    palette = torch.tensor(np.stack([colour(c) for c in range(10)]), dtype=torch.float32)
    return torch.cdist(rgb, palette).argmin(1).tolist()


# -- class lists ------------------------------------------------------------------------------
def test_subset_definitions_and_shipped_lists():
    wnids = imagenet1k_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    for name, expected in EXPECTED.items():
        assert subset_wnids(name) == expected == [wnids[i] for i in MTT_SUBSETS[name]]
    in100 = subset_wnids("ImageNet-100")
    assert len(in100) == len(set(in100)) == 100 and set(in100) <= set(wnids)
    assert in100[:2] == ["n02869837", "n01749939"] and in100[-1] == "n02090622"  # the CMC file's order


def test_wnid_list_files(tmp_path):
    good = tmp_path / "mine.txt"
    good.write_text("# my classes\nn02102040  # springer\n\n n01440764\n")
    assert read_wnid_list(good) == ["n02102040", "n01440764"] == subset_wnids(str(good))
    assert subset_wnids(["n03000684"]) == ["n03000684"]
    for text, match in (("n0144076\n", r"line 1: 'n0144076' is not a WordNet id"),
                        ("n01440764\n#\nn01440764\n", "line 3: n01440764 repeats line 1"),
                        ("# nothing\n", "lists no WordNet ids")):
        good.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_wnid_list(good)
    good.write_text("n01440764\nn99999999\n")
    with pytest.raises(ValueError, match=r"\['n99999999'\] is not ImageNet-1k"):
        subset_wnids(str(good))
    with pytest.raises(ValueError, match="neither a known ImageNet subset"):
        subset_wnids("imagenette2")


# -- the ImageNet source --------------------------------------------------------------------------
def test_domains_labels_and_targets(tree):
    data, warned = load_nette(tree)
    assert isinstance(data, ImageNetSubset) and isinstance(data, MultiDomainDataset)
    assert data.domains == ["imagenet", "imagenet-sketch", "imagenet-r", "imagenet-v2"]  # A: none of the classes
    assert any("imagenet-a" in w and "none of the 10 classes" in w for w in warned)
    assert any("imagenet-r lacks 3 of the 10 classes" in w for w in warned)
    assert data.train_domains == ["imagenet"] and data.target_domains == data.domains[1:]
    assert data.classes == NETTE and data.image_shape == (3, RES, RES) and data.bad_files == []
    assert data.missing_classes == {"imagenet": [], "imagenet-sketch": [], "imagenet-r": R_LACKS, "imagenet-v2": []}
    for c in range(10):
        assert data.count("imagenet", c, "train") == 4 and data.count("imagenet", c, "test") == 2
        for d in data.target_domains:
            assert data.count(d, c, "train") == 0
            assert data.count(d, c, "test") == (0 if d == "imagenet-r" and NETTE[c] in R_LACKS else 1)
    g = torch.Generator().manual_seed(0)
    for d in data.domains:  # every domain maps its folders to the right labels (V2: by class index)
        split = "train" if d == "imagenet" else "test"
        for c in range(10):
            if data.count(d, c, split):
                assert nearest_class(data.real_batch(d, c, 3, g, split=split), data) == [c] * 3, (d, c)
    x, y = data.split_tensors(["imagenet-r"], "test")  # a missing class is absent, never scored
    assert len(y) == 7 and not set(y.tolist()) & {2, 3, 4} and nearest_class(x, data) == y.tolist()
    with pytest.raises(ValueError, match="domain 'imagenet-r' has no test images of class 'n02979186'"):
        data.real_batch("imagenet-r", 2, 1, split="test")
    with pytest.raises(ValueError, match="no train images"):
        data.real_batch("imagenet-sketch", 0, 1)
    assert sample_domain_batches(data, ["imagenet"], 1, 5, g).shape == (1, 5, 3, RES, RES)
    assert data.files("imagenet-v2", 1, "test")[0].parent.name == "217"


def test_list_file_order_subset_size_and_resolution(tree, tmp_path):
    listing = tmp_path / "three.txt"
    listing.write_text("\n".join([NETTE[5], NETTE[0], NETTE[9]]) + "\n")
    data = load_dataset(f"imagenet:{listing}", root=tree["root"], resolution=8, train_per_class=2, progress=False)
    assert data.classes == [NETTE[5], NETTE[0], NETTE[9]] and data.domains == ["imagenet"]
    assert [data.count("imagenet", c) for c in range(3)] == [2, 2, 2] and data.image_shape == (3, 8, 8)
    assert nearest_class(data.real_batch("imagenet", 0, 2), data) == [5, 5]
    assert set(data.files("imagenet", 1)) < set((tree["root"] / "train" / NETTE[0]).iterdir())
    woof = ImageNetSubset(tree["root"], classes=[NETTE[1]], resolution=8, progress=False)  # wnids directly
    assert woof.classes == [NETTE[1]]


def test_layout_errors(tree, tmp_path):
    with pytest.raises(ValueError, match="needs root=.*--data-root"):
        load_dataset("imagewoof")
    with pytest.raises(ValueError, match=r"lacks the class folder\(s\) \['n02096294'"):
        load_dataset("imagewoof", root=tree["root"], progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageNetSubset(tmp_path / "nowhere")
    flat = tmp_path / "flat"
    shutil.copytree(tree["root"] / "train", flat / "train")
    (flat / "val").mkdir()
    shutil.copy(next((tree["root"] / "val" / NETTE[0]).iterdir()), flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ValueError, match="not sorted into <wnid>/ folders"):
        ImageNetSubset(flat, progress=False)
    with pytest.raises(FileNotFoundError, match="has no train/ folder"):  # given .../train instead of the root
        ImageNetSubset(tree["root"] / "train", progress=False)
    with pytest.raises(FileNotFoundError, match=r"sketch_root='.*nope' does not exist"):
        ImageNetSubset(tree["root"], sketch_root=tmp_path / "nope", progress=False)
    with pytest.raises(ValueError, match="imagenet-v2 root .* holds no class folders"):
        ImageNetSubset(tree["root"], v2_root=tree["r_root"], progress=False)


def test_cache_reuse_and_unreadable_files(tree, tmp_path):
    sketch = tmp_path / "sketch"
    shutil.copytree(tree["sketch_root"], sketch)
    broken = next((sketch / "sketch" / NETTE[7]).iterdir())
    broken.write_bytes(broken.read_bytes()[:100])  # truncated JPEG: the class's only sketch
    with pytest.warns(UserWarning) as caught:
        data = ImageNetSubset(tree["root"], sketch_root=sketch, resolution=RES, progress=False)
    assert sorted(str(w.message).split(" (")[0] for w in caught) == [
        "imagenet-sketch lacks 1 of the 10 classes", "skipped 1 unreadable image file(s)"]  # each said once
    assert data.decode_count == 10 * (4 + 2 + 1)  # every file of the splits used, once
    assert [p for p, _ in data.bad_files] == [str(broken)]
    assert data.missing_classes["imagenet-sketch"] == [NETTE[7]] and data.count("imagenet-sketch", 7, "test") == 0
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"), pytest.warns(UserWarning, match="lacks"):
        again = ImageNetSubset(tree["root"], sketch_root=sketch, resolution=RES, progress=False)
    assert again.decode_count == 0 and again.bad_files == data.bad_files and again.cache_key == data.cache_key
    other = ImageNetSubset(tree["root"], resolution=RES, crop="squash", progress=False)
    assert other.decode_count == 10 * 6 and other.cache_key != data.cache_key


# -- pseudo-domains on a source without domain labels -------------------------------------------------
def test_pseudo_domains_bounded_sample_and_cached(tree, monkeypatch):
    data = ImageNetSubset(tree["root"], resolution=RES, progress=False)
    pseudo = PseudoDomainDataset(data, 2, seed=0, domains=data.train_domains, fit_sample=12)
    assert pseudo.domains == ["pseudo0", "pseudo1"] and not pseudo.from_cache and pseudo.cache_path.is_file()
    for split, n in (("train", 40), ("test", 20)):  # every image assigned, fitted on 12 of them
        assert sum(pseudo.count(d, c, split) for d in pseudo.domains for c in range(10)) == n
        assert sum(len(pseudo.source_domain[d][split]) for d in pseudo.domains) == n
    x, y = pseudo.split_tensors(pseudo.domains, "train")
    ref, _ = data.split_tensors(["imagenet"], "train")
    assert torch.allclose(x.sum(0), ref.sum(0), atol=1e-3)  # the same images, regrouped, read through
    assert nearest_class(x, data) == y.tolist()

    def no_clustering(*a, **k):
        raise AssertionError("clustered again despite the cache")

    with monkeypatch.context() as patch:
        patch.setattr(pseudo_mod, "kmeans", no_clustering)
        again = PseudoDomainDataset(data, 2, seed=0, domains=data.train_domains, fit_sample=12)
        assert again.from_cache and all(torch.equal(again.source_domain[d]["train"], pseudo.source_domain[d]["train"])
                                        for d in pseudo.domains)
        assert [again.count(d, c) for d in again.domains for c in range(10)] == \
            [pseudo.count(d, c) for d in pseudo.domains for c in range(10)]
        with pytest.raises(AssertionError, match="clustered again"):  # other settings: another cache entry
            PseudoDomainDataset(data, 2, seed=1, domains=data.train_domains, fit_sample=12)

    pseudo.cache_path.write_bytes(b"PK\x03\x04 truncated")  # a damaged cache: said, then clustered again
    with pytest.warns(UserWarning, match="ignoring unreadable pseudo-domain cache"):
        redone = PseudoDomainDataset(data, 2, seed=0, domains=data.train_domains, fit_sample=12)
    assert not redone.from_cache and all(torch.equal(redone.source_domain[d]["test"], pseudo.source_domain[d]["test"])
                                         for d in pseudo.domains)

    class View:  # a view restricting the domains, like the CLI's DomainSubset
        def __init__(self, base, domains):
            self.base, self.domains = base, domains
            self.classes, self.image_shape, self.mean, self.std = base.classes, base.image_shape, base.mean, base.std

        def split_tensors(self, *a, **k):
            raise AssertionError("copied the whole split into memory")

    through = PseudoDomainDataset(View(data, ["imagenet"]), 2, fit_sample=12)
    assert through.from_cache and through.count("pseudo0", 0) == pseudo.count("pseudo0", 0)
    with pytest.warns(UserWarning, match="imagenet-r lacks"):
        via_loader = load_dataset("imagenette", root=tree["root"], r_root=tree["r_root"], resolution=RES,
                                  pseudo_domains=2, progress=False)
    assert via_loader.domains == ["pseudo0", "pseudo1"] and via_loader.base_domains == ["imagenet"]
