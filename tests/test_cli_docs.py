"""docs/cli.md against the parsers: every option of every command is documented in its section, and
every option the page names exists, so the page cannot fall behind the options declared on the configs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from relapse import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
OPTION = re.compile(r"(?<![\w-])--[a-z][\w-]*")
#: Options of other tools the page shows (accelerate, torchrun, pip).
OTHER_TOOLS = {"--multi_gpu", "--num_processes", "--nproc_per_node", "--cpu", "--no-deps", "--config_file"}


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[str, argparse.ArgumentParser]:
    """Every command that runs something, by its words (``data convert``), with its parser."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return {" ".join(path): parser}
    found: dict[str, argparse.ArgumentParser] = {}
    for name, sub in groups[0].choices.items():
        found.update(_commands(sub, (*path, name)))
    return found


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def _sections() -> dict[str, str]:
    """docs/cli.md's sections by heading: ``train`` for "## `relapse train`", else the heading's text."""
    sections: dict[str, str] = {}
    for block in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        heading, _, body = block.partition("\n")
        match = re.fullmatch(r"`relapse ([^`]+)`", heading.strip())
        sections[match.group(1) if match else heading.strip()] = body
    return sections


def _section_of(command: str, sections: dict[str, str]) -> str:
    """The section documenting ``command``: its own, else its group's (``models`` for ``models fetch``)."""
    words = command.split()
    for end in range(len(words), 0, -1):
        if " ".join(words[:end]) in sections:
            return sections[" ".join(words[:end])]
    raise AssertionError(f"docs/cli.md has no section for relapse {command}")


COMMANDS = _commands(cli.build_parser())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_documented_in_its_commands_section(command):
    sections = _sections()
    text = _section_of(command, sections) + sections["Common options"]
    documented = set(OPTION.findall(text))
    missing = sorted(_long_options(COMMANDS[command]) - documented)
    assert not missing, f"relapse {command}: options missing from docs/cli.md: {missing}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_usage_lines_name_only_options_the_command_has(command):
    usage = re.findall(r"^```\n(.*?)^```", _section_of(command, _sections()), flags=re.M | re.S)
    lines = [line for line in usage[0].splitlines() if line.strip()] if usage else []
    words = command.split()
    own = [line for line in lines if line.split()[: 1 + len(words)] == ["relapse", *words]]
    own += [line for line in lines if not line.startswith("relapse ")]  # continuation lines
    unknown = sorted(set(OPTION.findall("\n".join(own))) - _long_options(COMMANDS[command]))
    assert not unknown, f"relapse {command}: docs/cli.md's usage names options it does not have: {unknown}"


def test_every_option_the_page_names_exists():
    known = set().union(*(_long_options(p) for p in COMMANDS.values()), _long_options(cli.build_parser()))
    unknown = sorted(set(OPTION.findall(DOC.read_text())) - known - {"--help"} - OTHER_TOOLS)
    assert not unknown, f"docs/cli.md names options no command has: {unknown}"
