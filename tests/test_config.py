"""sgs_cuda/config.py: the configuration's layers (defaults, preset, file, overrides, a saved
run's config), the one-line errors naming an option, and the run-folder format check."""
import math

import pytest

from sgs_cuda import config
from sgs_cuda._io import RunFolderError
from sgs_cuda.config import FORMAT_VERSION, check_format, default_config, resolve_config


def test_resolve_config_layers(tmp_path):
    quick = resolve_config(preset="quick")
    assert quick["distill"]["iterations"] == 200 and quick["methods"] == ["dm", "dm_sgs"]
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  iterations: 77\n  ipc: 3\nseeds: 4\n")
    cfg = resolve_config({"distill.ipc": 5, "methods": "both random", "sgs.alpha": 0.5}, preset="quick",
                         config_file=path)
    assert cfg["distill"]["iterations"] == 77 and cfg["distill"]["ipc"] == 5  # file < overrides
    assert cfg["distill"]["width"] == quick["distill"]["width"] and cfg["seeds"] == [4]
    assert cfg["methods"] == ["dm", "dm_sgs", "random"] and cfg["sgs"]["alpha"] == 0.5
    # a resumed run's saved config replaces the defaults; later layers still apply
    again = resolve_config({"eval.epochs": 3}, saved=cfg)
    assert again["distill"]["iterations"] == 77 and again["eval"]["epochs"] == 3
    assert config.parse_assignment("sgs.beta=0") == ("sgs.beta", 0)
    assert config.parse_assignment("device = cuda:1") == ("device", "cuda:1")


@pytest.mark.parametrize("overrides,message", [
    ({"distill.iterations": "abc"}, "'distill.iterations' must be an integer, got 'abc'"),
    ({"distill.iterations": 2.5}, "'distill.iterations' must be an integer"),
    ({"sgs.tau": True}, "'sgs.tau' must be a number"),
    ({"eval.dsa": "yes"}, "'eval.dsa' must be true or false"),
    ({"sgs.mask": 1}, "'sgs.mask' must be a string"),
    ({"data_kwargs": [1]}, "'data_kwargs' must be a mapping"),
    ({"seeds": ["x"]}, "'seeds' must be integers"),
    ({"distill.ipcs": 1}, "unknown config option 'distill.ipcs'"),
    ({"nope.x": 1}, "unknown config section 'nope'"),
])
def test_resolve_config_names_the_option(overrides, message):
    with pytest.raises(ValueError) as info:
        resolve_config(overrides)
    assert message in str(info.value)


def test_config_files_that_do_not_parse_are_named(tmp_path):
    for name, text in (("c.json", '{"distill": {"ipc": 2'), ("c.yaml", "distill: [1, 2"), ("l.json", "[1]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as info:
            resolve_config(config_file=tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)


def test_saved_run_folder_configs_keep_their_settings():
    saved = default_config()
    saved["distill"].update(depth=3, precision="float32", channels_last=False)
    cfg = resolve_config(saved=saved)
    assert cfg["distill"]["precision"] == "float32"
    assert cfg["distill"]["channels_last"] is False and cfg["distill"]["depth"] == 3
    fresh = resolve_config({"distill.depth": "auto", "distill.channels_last": True})
    assert fresh["distill"]["depth"] == "auto"
    assert resolve_config({"distill.depth": 5}, saved=saved)["distill"]["depth"] == 5
    assert math.isclose(resolve_config({"distill.memory_gib": 2})["distill"]["memory_gib"], 2)


def test_a_run_folder_of_another_format_is_refused_in_one_line(tmp_path):
    path = tmp_path / "config.json"
    check_format({"format_version": FORMAT_VERSION}, path)
    for found, needle in ((None, "unversioned"), (FORMAT_VERSION - 1, f"format {FORMAT_VERSION - 1}")):
        with pytest.raises(RunFolderError, match="older sgs_cuda") as info:
            check_format({} if found is None else {"format_version": found}, path)
        assert needle in str(info.value) and "new --run-dir" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(RunFolderError, match="newer sgs_cuda"):
        check_format({"format_version": FORMAT_VERSION + 1}, path)
