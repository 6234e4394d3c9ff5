"""``relapse report``: rebuild an audit's report from its results.json (nothing evaluated again)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "rebuild an audit's report from its results.json"


def add(commands) -> None:
    p = commands.add_parser(
        "report",
        help=HELP,
        description="Recompute recovery ratios and verdicts from DIR/results.json and write report.md, "
        "report.html and the plots into DIR (nothing is evaluated again).",
    )
    p.add_argument("directory", type=Path, help="an audit's --out folder")
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        metavar="FILE",
        help="a YAML or JSON file of published values to show beside the measured ones (kept in DIR as "
        "reference.json for later builds; docs/references/ has MUSE's and TOFU's)",
    )
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    from relapse.audit.recovery import finish
    from relapse.cli.tables import verdict_table
    from relapse.report import build_report, load_results

    results = finish(load_results(args.directory))
    paths = build_report(args.directory, reference=args.reference, results=results)
    print(verdict_table(results))
    print(f"\nreport: {paths['report.html']}")
    return 0
