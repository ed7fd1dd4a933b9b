"""The loop's results on fixed seeds, bit for bit: fingerprints of the images and of the history
recorded with the loop as it was before it was split into pieces (one pass and chunked, both
spaces, both matchings, the step options, the mask-against-truth diagnostic, a resumed run).
A change that moves any of them changes the trajectory: say so, and record them again."""
import hashlib
import json

import pytest
import torch
from tiny_domains import TinyDomains

from sgs_cuda import SGSConfig
from sgs_cuda.dm import DistillConfig, distill

DOMAINS = ["d0", "d1", "d2"]


class CueDomains(TinyDomains):
    """TinyDomains with a known cue (the ``cue_bins`` of fmnist-cues): the history gets ``truth``."""

    def __init__(self):
        super().__init__(K=4)
        self.cue_bins = torch.zeros(8, 5, dtype=torch.bool)
        self.cue_bins[1:3, 1:3] = True


def cfg(**kw):
    return DistillConfig(**{**dict(method="dm_sgs", ipc=2, iterations=4, batch_real=6, width=8, depth=2,
                                   log_every=2), **kw})


def fingerprint(result) -> tuple[str, str]:
    images = hashlib.sha256(result.images.contiguous().numpy().tobytes()).hexdigest()[:16]
    recorded = dict(result.history)
    if "truth" in recorded:  # the per-class group came later (tests/test_fmnist_cues.py checks it)
        recorded["truth"] = {k: v for k, v in recorded["truth"].items() if k != "own"}
    history = hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()[:16]
    return images, history


# name: (data, config, (images, history) fingerprints recorded before the loop was split)
CASES = {
    "dm": (TinyDomains, cfg(method="dm"), ("bc7f6747981cda52", "c2f3ab17e88a92a3")),
    "dm_sgs": (TinyDomains, cfg(), ("628b929c77c4e6ef", "365128d2987d9281")),
    "dm_sgs_chunked": (TinyDomains, cfg(class_chunk=1), ("628b929c77c4e6ef", "f6163a35da9af24f")),
    "spatial": (TinyDomains, cfg(sgs=SGSConfig(space="spatial")), ("e11b5fd3bcec7707", "2763a6ba9e425473")),
    "m3d_fixed_dm_norm": (TinyDomains, cfg(matching="m3d", sgs=SGSConfig(assignment="fixed", normalize="dm_norm")),
                          ("ad899ce57c25b984", "a6e5c5e69cd77607")),
    "kept_fraction_noise": (TinyDomains, cfg(init="noise", sgs=SGSConfig(normalize="kept_fraction")),
                            ("9bcedbb2cf17d903", "d160b8569dce71f8")),
    "truth": (CueDomains, cfg(), ("4aca417610e3bf64", "6fd7c14f33abc116")),
    "truth_chunked": (CueDomains, cfg(class_chunk=1), ("4aca417610e3bf64", "e4353c70f7cd5f3a")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_results_on_fixed_seeds_are_unchanged(name):
    data, config, recorded = CASES[name]
    result = distill(data(), DOMAINS, config, progress=False, log=lambda m: None)
    assert fingerprint(result) == recorded


def test_a_resumed_run_is_unchanged(tmp_path):
    distill(TinyDomains(), DOMAINS, cfg(iterations=2, checkpoint_every=2), run_dir=tmp_path, progress=False,
            log=lambda m: None)
    resumed = distill(TinyDomains(), DOMAINS, cfg(checkpoint_every=2), run_dir=tmp_path, resume=True,
                      progress=False, log=lambda m: None)
    assert fingerprint(resumed) == CASES["dm_sgs"][2]
