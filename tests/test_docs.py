"""The commands the README and `sgs-dgdd --help` show parse, name presets that exist, and the
Python examples import names that exist (nothing is run: the commands are checked, not timed)."""
import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from sgs_cuda import cli
from sgs_cuda.config import available_presets

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _shell_commands(block: str) -> list[str]:
    """Logical lines (backslash continuations joined, comments dropped), split at && and ;."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            out += [part.strip() for part in re.split(r"&&|;", line) if part.strip()]
    return out


def _cli_argv(command: str) -> list[str] | None:
    """The sgs-dgdd arguments of a shell command (``sgs-dgdd ...`` or ``torchrun ... -m sgs_cuda.cli ...``)."""
    words = shlex.split(command)
    if words and words[0] == "sgs-dgdd":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["sgs_cuda.cli"]:
        return words[words.index("-m") + 2:]
    return None


def _documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for block in _code_blocks(doc.read_text(), "bash"):
            for command in _shell_commands(block):
                argv = _cli_argv(command)
                if argv is not None:
                    found.append((f"{doc.name}: {command}", argv))
    help_examples = cli.__doc__.split("\n\n")[1]
    for command in _shell_commands(help_examples):
        argv = _cli_argv(command)
        if argv is not None:
            found.append((f"sgs-dgdd --help: {command}", argv))
    return found


COMMANDS = _documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 20  # the search itself works: the README shows many
    assert any(argv[:3] == ["run", "--preset", "quick"] for _, argv in COMMANDS)  # the main command


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[c[0][:90] for c in COMMANDS])
def test_documented_command_parses(where, argv):
    args = cli.build_parser().parse_args(argv)  # argparse exits (a failure here) on a bad flag
    preset = getattr(args, "preset", None)
    if preset is not None:
        assert preset in available_presets(), f"{where}: no preset {preset!r}"


def test_python_examples_import_names_that_exist():
    checked = 0
    for block in _code_blocks((ROOT / "README.md").read_text(), "python"):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("sgs_cuda"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"README: {node.module} has no {alias.name}"
                    checked += 1
    assert checked >= 5
