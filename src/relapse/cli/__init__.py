"""The ``relapse`` command line: one module per command, each with ``HELP``, ``add`` and ``execute``.

Every subcommand has ``--help``. Problems with the user's input end with a one-line ``relapse: error:``
message and exit status 2, never a traceback; results are never overwritten without ``--overwrite``.
Options that set a model's config (``relapse train``, ``relapse unlearn``) are declared once, on the
config dataclass's fields, and generated here by :mod:`relapse.cli.fields`. The command modules import
only argparse at the top; each imports the library (torch, transformers) inside ``add``/``execute``, so
``relapse --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from relapse import __version__
from relapse.cli import attack, audit, data, demo, diff, evaluate, models, plan, report, run, train, unlearn
from relapse.errors import RelapseError

EXIT_USAGE = 2

COMMANDS = {  # in the order --help lists them
    "data": data,
    "models": models,
    "train": train,
    "unlearn": unlearn,
    "attack": attack,
    "diff": diff,
    "eval": evaluate,
    "audit": audit,
    "report": report,
    "run": run,
    "demo": demo,
    "plan": plan,
}

COMMAND_HELP = {name: module.HELP for name, module in COMMANDS.items()}  # every command's one-line help


def build_parser(only: str | None = None, *, lazy: bool = False) -> argparse.ArgumentParser:
    """The CLI's argument parser.

    Building a command's options imports torch and transformers (for defaults and choices), which takes
    seconds. With ``lazy``, only the command named ``only`` is built in full and every other command is
    listed by name and help line, so ``relapse --help`` answers at once; without it every command is built.
    """
    parser = argparse.ArgumentParser(
        prog="relapse",
        description="LLM unlearning that does not fool itself: unlearn, attack, measure, report.",
    )
    parser.add_argument("--version", action="version", version=f"relapse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if lazy and name != only:
            commands.add_parser(name, help=module.HELP)
        else:
            module.add(commands)
    return parser


def _requested_command(argv: Sequence[str]) -> str | None:
    """The command word of a command line: its first argument that is not an option (the top-level
    options take no values)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 success, 2 a problem with the input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_requested_command(argv), lazy=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="relapse: %(levelname)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _quiet_transformers()
    try:
        return args.func(args)
    except RelapseError as exc:
        print(f"relapse: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        from relapse.runtime import WRITE_ERRNOS

        if exc.errno not in WRITE_ERRNOS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"relapse: error: cannot write{where}: {exc.strerror}; finished work is saved, and a rerun "
            "resumes once there is room (or permission)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("relapse: interrupted; finished work is saved and a rerun resumes", file=sys.stderr)
        return 130


def _quiet_transformers() -> None:
    """Hide transformers' per-file progress bars; relapse prints its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
