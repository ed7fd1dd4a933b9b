"""sgs_cuda/compare.py: what a run folder's methods are called in a comparison (the arms)."""
from sgs_cuda.compare import arm_name
from sgs_cuda.config import resolve_config


def test_arm_names():
    cfg = resolve_config({"distill.matching": "m3d", "sgs.space": "spatial"})
    assert arm_name(cfg, "dm") == "M3D"
    assert arm_name(cfg, "dm_sgs") == "M3D+SGS (space=spatial)"
    assert arm_name(resolve_config(), "dm_sgs") == "DM+SGS" and arm_name(None, "random") == "random"
    assert arm_name({**cfg, "label": "mine"}, "dm") == "mine"
    assert arm_name({**cfg, "label": "mine"}, "dm", 2) == "mine: M3D"
