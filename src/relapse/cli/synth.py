"""``relapse data synth``: write the built-in benchmark of fictitious people."""

from __future__ import annotations

import argparse
from pathlib import Path

from relapse.cli.common import add_overwrite

HELP = "generate the built-in benchmark of fictitious people"


def add(subparsers) -> None:
    from relapse.data.synth import FACT_KINDS

    p = subparsers.add_parser(
        "synth",
        help=HELP,
        description="Write the built-in benchmark (fictitious people with facts, as biographies and QA "
        "pairs) to a folder in relapse's benchmark format. Deterministic from --seed.",
    )
    p.add_argument("--out", required=True, type=Path, help="folder to write the benchmark to")
    p.add_argument("--people", type=int, default=200, help="people in forget + retain (default 200)")
    p.add_argument(
        "--facts-per-person",
        type=int,
        default=5,
        help=f"facts per person, 1..{len(FACT_KINDS)} (default 5)",
    )
    p.add_argument("--forget-frac", type=float, default=0.1, help="share of people to forget (default 0.1)")
    p.add_argument(
        "--holdout",
        type=int,
        default=None,
        help="people never trained on, for membership inference (default: as many as forget)",
    )
    p.add_argument("--general", type=int, default=200, help="general sentences for perplexity (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_overwrite(p, "a different benchmark already in --out")
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    """Generate, then write unless ``--out`` already holds exactly this benchmark."""
    from relapse.data.synth import synth_benchmark
    from relapse.errors import ConfigError

    benchmark = synth_benchmark(
        people=args.people,
        facts_per_person=args.facts_per_person,
        forget_frac=args.forget_frac,
        holdout=args.holdout,
        seed=args.seed,
        general=args.general,
    )
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a folder")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        if not benchmark.is_saved_in(args.out):
            raise ConfigError(
                f"{args.out} is not empty and holds something else; pass --overwrite to replace it"
            )
        print(f"{args.out} already holds this benchmark (same settings and seed); nothing to do")
        return 0
    benchmark.save(args.out)
    counts = benchmark.meta["counts"]
    print(
        f"wrote {args.out}: {counts['forget_people']} forget, {counts['retain_people']} retain, "
        f"{counts['holdout_people']} holdout people; {counts['forget_qa']} forget and "
        f"{counts['retain_qa']} retain QA pairs (seed {args.seed})"
    )
    return 0
