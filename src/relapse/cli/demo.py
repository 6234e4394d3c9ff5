"""``relapse demo``: the shipped experiment file on the built-in benchmark (see ``relapse.demo``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from relapse.cli.common import add_experiment_options, run_context

HELP = "run the main job on the built-in benchmark: train, unlearn, attack, audit, report"


def add(commands) -> None:
    p = commands.add_parser(
        "demo",
        help=HELP,
        description="Generate the built-in benchmark, train the target (forget + retain) and retrained "
        "(retain only) models, unlearn with GA, GA+GDR, NPO, NPO+GDR, NPO+KLR, SimNPO+GDR, RMU, SURE "
        "(each at the learning rate that keeps the most utility) and NPO+GDR in bfloat16, audit every "
        "model under quantization, relearning and noise, print a verdict per "
        "method and write the report. Runs the shipped experiment file demo.yaml (see docs/experiments.md); "
        "models are cached, so a second run takes a fraction of the time.",
    )
    p.add_argument(
        "--out", type=Path, default=Path("relapse-demo"), help="output folder (default ./relapse-demo)"
    )
    p.add_argument("--fast", action="store_true", help="a smaller version that runs in about two minutes")
    add_experiment_options(p)
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    from relapse.cli.tables import print_experiment
    from relapse.demo import run_demo

    result = run_demo(
        args.out,
        fast=args.fast,
        run=run_context(args),
        jobs=args.jobs,
        seeds=args.seeds,
    )
    print_experiment(result)
    return 0
