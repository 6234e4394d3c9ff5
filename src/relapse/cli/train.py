"""``relapse train``: a target or retrained model; every option but the paths is a ``TrainConfig`` field."""

from __future__ import annotations

import argparse
from pathlib import Path

from relapse.cli.common import add_common_training, add_overwrite, run_context, run_summary

HELP = "train a target or retrained model (tiny from scratch, or fine-tune --from a model)"


def add(commands) -> None:
    from relapse.cli.fields import add_config_options
    from relapse.training.finetune import TrainConfig

    p = commands.add_parser(
        "train",
        help=HELP,
        description="Train on a benchmark's texts and QA pairs until QA recall reaches --stop-recall. "
        "'--on forget+retain' gives the target model, '--on retain' the retrained reference. Checkpoints "
        "are written as it goes and a killed run resumes; a model already trained with the same data, "
        "settings and seed is returned at once.",
    )
    p.add_argument("--data", required=True, type=Path, help="benchmark folder")
    p.add_argument("--out", required=True, type=Path, help="folder to save the model to")
    p.add_argument(
        "--from",
        dest="base",
        default=None,
        help="model folder or hub id to fine-tune (default: a tiny Llama from scratch)",
    )
    add_config_options(p, TrainConfig)
    add_overwrite(p, "a different model already in --out")
    add_common_training(p)
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    from relapse.cli.fields import config_from_args
    from relapse.training.finetune import TrainConfig, train_model
    from relapse.training.parallel import is_main_process

    result = train_model(
        args.data,
        args.out,
        config_from_args(TrainConfig, args),
        base=args.base,
        run=run_context(args),
    )
    if not is_main_process():  # under a data-parallel launcher only the main process reports
        return 0
    print(f"{result.path}: {run_summary(result, 'cached, trained earlier')}")
    return 0
