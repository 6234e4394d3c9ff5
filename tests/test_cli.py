"""The command line's parser: every command is reachable, and `relapse --help` stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from relapse import cli


def _subparsers(parser):
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")


def _shape(parser) -> dict:
    """A parser's options and positionals and, for a command group, its subcommands' shapes."""
    names = [action.option_strings or [action.dest] for action in parser._actions]
    shape: dict = {"options": sorted(name for group in names for name in group)}
    nested = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    if nested:
        shape["commands"] = {name: _shape(sub) for name, sub in nested[0].choices.items()}
    return shape


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys, contextlib, io\n"
        "from relapse.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
        "print(out.getvalue())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, _, help_text = result.stdout.partition("\n")
    assert first == "False False"
    for name, line in cli.COMMAND_HELP.items():
        assert name in help_text
        assert line.split()[0] in help_text


@pytest.mark.parametrize("command", sorted(cli.COMMAND_HELP))
def test_lazy_parser_builds_the_requested_command_in_full(command):
    full = _subparsers(cli.build_parser())
    lazy = _subparsers(cli.build_parser(command, lazy=True))
    assert list(lazy.choices) == list(full.choices) == list(cli.COMMAND_HELP)
    stub = {"options": ["--help", "-h"]}  # a command listed by name only
    assert _shape(lazy.choices[command]) == _shape(full.choices[command]) != stub
    assert all(_shape(lazy.choices[name]) == stub for name in lazy.choices if name != command)


@pytest.mark.parametrize(
    ("argv", "command"),
    [(["-v", "train", "--data", "x"], "train"), (["--help"], None), (["demo"], "demo"), ([], None)],
)
def test_requested_command_is_the_first_word(argv, command):
    assert cli._requested_command(argv) == command
