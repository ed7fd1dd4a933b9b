"""The dataset registry (``sgs_cuda/data/registry.py``): the one place dataset names live, read by
``load_dataset``, the pipeline's checks and the ``--dataset`` help; a new dataset is one line."""
from __future__ import annotations

import pytest
import torch

from sgs_cuda import cli, experiment
from sgs_cuda.data import DataSource, InMemoryDomains, load_dataset
from sgs_cuda.data.registry import DATASETS, find, key, names, register


def test_names_resolve_through_the_registry():
    assert find("Digits-DG")[0] is find("digits")[0] and find("pacs")[0].name == "PACS"
    assert find("imagenet:my_list.txt")[1] == "my_list.txt" and find("imagenet") is None
    assert {"digits", "CORe50", "PACS", "fmnist-styles", "fmnist-cues", "imagenette"} <= set(names())
    for name in ("digits", "CORe50"):
        assert experiment.data_source(name) == (DATASETS[key(name)].kind, DATASETS[key(name)].cls)
        assert experiment._preset_needing_root(name) == name
    run = cli.build_parser()._subparsers._group_actions[0].choices["run"]
    help_text = " ".join(run.format_help().split())
    assert "dataset name (fmnist-styles, fmnist-cues, PACS," in help_text and "imagenet:<classes>, digits, CORe50) or folder" in help_text
    with pytest.raises(ValueError, match=r"dataset 'digits' needs root=<folder holding the digit domains"):
        load_dataset("digits")
    with pytest.raises(ValueError, match="data option 'frames' does not apply to dataset 'core50' "
                                         r"\(the CORe50 benchmark\); its data options: sessions, level, resolution"):
        experiment.check_data_kwargs("core50", {"frames": 3})
    with pytest.raises(ValueError, match="dataset 'imagenette' already names its classes; drop classes="):
        load_dataset("imagenette", root=".", classes=["n01440764"])


class Blocks(InMemoryDomains):
    """A generated two-domain source that needs no root (as a generated benchmark would)."""

    def __init__(self, root=None, per_class: int = 2):
        x = torch.arange(2 * per_class, dtype=torch.uint8).repeat_interleave(3 * 4 * 4).view(-1, 3, 4, 4)
        y = torch.arange(2).repeat_interleave(per_class)
        super().__init__({d: {"train": (x, y), "test": (x, y)} for d in ("left", "right")}, ["a", "b"])


@pytest.fixture
def blocks():
    register("blocks", Blocks, None, "blocks", "the blocks benchmark", aliases=("block-set",))  # the one line
    yield
    for k in ("blocks", "blockset"):
        DATASETS.pop(k)


def test_a_new_dataset_is_one_register_line(blocks):
    data = load_dataset("Block-Set", per_class=3)
    assert isinstance(data, DataSource) and data.domains == ["left", "right"] and data.count("left", 1) == 3
    assert data.real_batch("right", 0, 5).shape == (5, 3, 4, 4)  # the base class's real_batch
    assert data.missing_domains == {} and data.train_domains is None and list(data.bad_files) == []
    assert "blocks" in names() and experiment.data_source("blocks") == ("blocks", Blocks)
    assert experiment._preset_needing_root("blocks") is None  # no --data-root needed
    experiment.check_data_kwargs("blocks", {"per_class": 3})
    with pytest.raises(ValueError, match=r"data option 'size' does not apply to dataset 'blocks' \(the blocks "
                                         r"benchmark\); its data options: per_class"):
        experiment.check_data_kwargs("blocks", {"size": 3})
    with pytest.raises(ValueError, match="clashes with 'blocks'"):
        register("BLOCKS", Blocks, None, "blocks", "again")
