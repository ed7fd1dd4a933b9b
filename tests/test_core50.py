"""CORe50 on a generated ``core50_128x128/s1..s11/o1..o50/*.png`` tree: sessions as domains, the
objects grouped into categories or kept as classes, named target sets."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from benchmark_files import CORE50_COLOURS, make_core50
from sgs_cuda import config, experiment
from sgs_cuda.data import load_dataset
from sgs_cuda.data.core50 import CATEGORIES, CORe50, OUTDOOR, SESSIONS


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_core50(tmp_path_factory.mktemp("core50"), frames=2)


def test_sessions_are_domains_and_objects_group_into_categories(root, tmp_path):
    data = load_dataset("core50", root=root, cache_dir=tmp_path / "c", progress=False)  # the parent folder works
    assert isinstance(data, CORe50) and data.domains == list(SESSIONS) and data.classes == list(CATEGORIES)
    assert data.image_shape == (3, 64, 64) and not data.bad_files
    for c, colour in enumerate(CORE50_COLOURS):  # 5 objects x 2 frames per session, 20 % held out
        assert data.count("s7", c, "train") + data.count("s7", c, "test") == 10
        x = data.uint8_images("s7", c, np.arange(data.count("s7", c)), "train").int()
        assert (x - torch.tensor(colour).view(1, 3, 1, 1)).abs().max() <= 2
    objects = CORe50(root / "core50_128x128", sessions=["s1", "s4"], level="object", resolution=32,
                     cache_dir=tmp_path / "c", progress=False)
    assert objects.domains == ["s1", "s4"] and len(objects.classes) == 50 and objects.classes[7] == "o8"
    assert objects.count("s4", 7, "train") + objects.count("s4", 7, "test") == 2


def test_named_target_sets_and_missing_sessions(root, tmp_path):
    data = load_dataset("CORe50", root=root, cache_dir=tmp_path / "c", progress=False)
    assert data.target_groups["outdoor"] == OUTDOOR and len(data.target_groups["indoor"]) == 8
    cfg = config.resolve_config({"dataset": "core50", "data_root": str(root), "target": "outdoor",
                                     "data_kwargs": {"cache_dir": str(tmp_path / "c")}})
    prepared = experiment.prepare_data(cfg)
    assert prepared.targets == list(OUTDOOR) and prepared.sources == [s for s in SESSIONS if s not in OUTDOOR]
    broken = tmp_path / "broken"
    shutil.copytree(root / "core50_128x128", broken)
    shutil.rmtree(broken / "s5")
    with pytest.raises(ValueError, match="domain 's5' not found in .*broken"):
        CORe50(broken, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError, match="no CORe50 session folder .* expected core50_128x128/s1"):
        CORe50(broken / "s1", cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="level must be 'category' or 'object'"):
        CORe50(broken, level="things")
