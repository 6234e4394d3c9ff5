"""``relapse run``: every step of a YAML experiment file, each cached or resumable."""

from __future__ import annotations

import argparse
from pathlib import Path

from relapse.cli.common import add_experiment_options, run_context

HELP = "run an experiment file: data, training, unlearning, audit and report"


def add(commands) -> None:
    p = commands.add_parser(
        "run",
        help=HELP,
        description="Run every step of a YAML experiment file (see docs/experiments.md; `relapse demo` "
        "runs the shipped demo.yaml). Each step is cached or resumable, so a rerun only reads.",
    )
    p.add_argument("experiment", type=Path, help="the experiment file (.yaml)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_experiment_options(p)
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    from relapse.cli.tables import print_experiment
    from relapse.experiment import load_experiment, run_experiment

    result = run_experiment(
        load_experiment(args.experiment),
        args.out,
        run=run_context(args),  # device None: the experiment file's device key, else auto
        jobs=args.jobs,
        seeds=args.seeds,
    )
    print_experiment(result)
    return 0
