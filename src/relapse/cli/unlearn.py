"""``relapse unlearn``: every option but the paths is an ``UnlearnConfig`` field (see ``fields.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from relapse.cli.common import add_common_training, add_overwrite, run_context, run_summary

if TYPE_CHECKING:
    from relapse.methods.unlearn import UnlearnResult

HELP = "unlearn the forget set from a model (GA, NPO, +GDR/KLR, optionally SURE's mask)"


def add(commands) -> None:
    from relapse.cli.fields import add_config_options
    from relapse.methods.registry import term_summaries
    from relapse.methods.unlearn import UnlearnConfig

    losses_help = "; ".join(f"{k}: {v}" for k, v in term_summaries().items())
    p = commands.add_parser(
        "unlearn",
        help=HELP,
        description="Unlearn a benchmark's forget set from a model and save the result with unlearn.json "
        f"(settings, seed, versions, loss curve, recall history, weight change, SURE mask). {losses_help}.",
    )
    p.add_argument("--model", required=True, help="model folder or hub id to unlearn from")
    p.add_argument("--data", required=True, type=Path, help="benchmark folder")
    p.add_argument("--out", required=True, type=Path, help="folder to save the unlearned model to")
    add_config_options(p, UnlearnConfig)
    add_overwrite(p, "a different model already in --out")
    add_common_training(p)
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    from relapse.cli.fields import config_from_args
    from relapse.methods.unlearn import UnlearnConfig, unlearn_model
    from relapse.training.parallel import is_main_process

    result = unlearn_model(
        args.model,
        args.data,
        args.out,
        config_from_args(UnlearnConfig, args),
        run=run_context(args),
    )
    if not is_main_process():  # under a data-parallel launcher only the main process reports
        return 0
    _print_record(result)
    return 0


def _print_record(result: UnlearnResult) -> None:
    """The run's summary line, then a line for each of selection, over-unlearning, robustness and SURE."""
    record = result.record
    print(
        f"{result.path}: {record['method']}, {run_summary(result, 'cached, unlearned earlier')}; "
        f"mean |dW| {record['weight_change']['mean_abs']:.3g}"
    )
    selection = record.get("selection")
    if selection:
        tried = "; ".join(_candidate_text(row) for row in selection["candidates"])
        print(f"selected lr {selection['chosen_lr']:g} of: {tried}")
    if (record.get("utility") or {}).get("over_unlearned"):
        utility = record["utility"]
        print(
            f"over-unlearned: retain recall {utility['final_recall_retain']:.2f} is below "
            f"{utility['floor']:.0%} of the starting model's {utility['start_recall_retain']:.2f}"
        )
    if record.get("robust"):
        print(f"robust to: {', '.join(record['robust']['grids'])} (one grid per step, straight-through)")
    if record.get("sure"):
        sure = record["sure"]
        print(
            f"SURE ({sure['granularity']}, top {sure['top']}): "
            f"{sure['trainable_share']:.1%} of weights trainable; "
            f"frozen weights bit-identical: {sure['frozen_elements_identical']}"
        )


def _candidate_text(row: dict) -> str:
    """One learning rate of a selection sweep, as ``unlearn`` prints it."""
    if "skipped" in row or "diverged" in row:
        return f"{row['lr']:g}: {'skipped' if 'skipped' in row else 'diverged'}"
    final = row["final"]
    text = f"{row['lr']:g}: {row['steps']} steps, forget {final['recall_forget']:.2f}, "
    return text + f"retain {final['recall_retain']:.2f}" + ("" if row["reached_target"] else " (no target)")
