"""``relapse data``: the commands that write benchmark folders (``synth``, ``convert``) and lm-eval tasks
from them (``lm-eval-task``)."""

from __future__ import annotations

from relapse.cli import convert, lm_eval_task, synth

HELP = "benchmark data: generate the built-in benchmark, convert MUSE, TOFU, text or JSONL data"


def add(commands) -> None:
    data = commands.add_parser(
        "data", help=HELP, description="Commands that write benchmark folders, and lm-eval tasks from them."
    )
    data_commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    synth.add(data_commands)
    convert.add(data_commands)
    lm_eval_task.add(data_commands)
