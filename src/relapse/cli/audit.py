"""``relapse audit``: sweep models x attacks x metrics, then write the report.

Its options are not ``AuditConfig``'s fields one to one (``--attacks`` and ``--metrics`` are comma lists
that name groups and are resolved here, paths are strings in the config), so they are plain argparse.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from relapse.cli.common import add_common_training, add_jobs, add_overwrite, run_context

HELP = "did the model really forget? sweep models x attacks x metrics and write the report"


def add(commands) -> None:
    from relapse.audit.sweep import DEFAULT_ATTACKS, DEFAULT_AUDIT_METRICS

    p = commands.add_parser(
        "audit",
        help=HELP,
        description="Evaluate the target, the retrained reference and each unlearned model as they are and "
        "under each attack (applied in memory, one load per model), write results.json after every cell "
        "(a killed audit resumes where it stopped), compute the recovered share of the forgetting gap per "
        "metric and attack, the weight diagnostics, a verdict per unlearned model, and the report "
        "(report.md, report.html, plots). See docs/audit.md.",
    )
    p.add_argument("--target", required=True, help="the model before unlearning")
    p.add_argument("--unlearned", required=True, nargs="+", help="one or more unlearned models")
    p.add_argument("--retrained", default=None, help="the model trained without the forget set (control)")
    p.add_argument("--data", required=True, type=Path, help="benchmark folder")
    p.add_argument(
        "--attacks",
        default=",".join(DEFAULT_ATTACKS),
        help=f"comma-separated (default {','.join(DEFAULT_ATTACKS)})",
    )
    p.add_argument(
        "--metrics", default=DEFAULT_AUDIT_METRICS, help=f"names or groups (default {DEFAULT_AUDIT_METRICS})"
    )
    p.add_argument(
        "--primary",
        default=None,
        help="the metric verdicts follow, declared before the sweep (knowmem_forget, verbmem_forget, "
        "recall_forget, nll_forget or a TOFU forget metric such as tofu_forget_quality; default: the "
        "first of the first three that is measured)",
    )
    p.add_argument("--calibration", type=Path, default=None, help="calibration text for GPTQ/AWQ attacks")
    p.add_argument(
        "--batch-size", type=int, default=None, help="evaluation batch size (default: from memory)"
    )
    p.add_argument("--out", required=True, type=Path, help="folder for results.json and the report")
    add_overwrite(p, "an audit with other settings in --out")
    p.add_argument("--seed", type=int, default=0, help="seed for noise and relearning attacks (default 0)")
    add_common_training(p)
    add_jobs(p)
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    from relapse.attacks.registry import parse_attacks
    from relapse.audit.sweep import AuditConfig, run_audit
    from relapse.cli.tables import verdict_table
    from relapse.metrics.engine import resolve_metrics
    from relapse.report import build_report

    metrics = resolve_metrics(args.metrics)
    if args.retrained is None and "privleak" in metrics:
        metrics.remove("privleak")
        print("note: no --retrained model, so no privleak (and no control for the recovery ratios)")
    config = AuditConfig(
        target=args.target,
        unlearned=list(args.unlearned),
        retrained=args.retrained,
        data=str(args.data),
        attacks=[a.name for a in parse_attacks(args.attacks)],
        metrics=metrics,
        seed=args.seed,
        batch_size=args.batch_size,
        calibration=str(args.calibration) if args.calibration else None,
        primary=args.primary,
        device=args.device or "auto",
    )
    results = run_audit(
        config,
        args.out,
        run=run_context(args),
        jobs=args.jobs,
    )
    paths = build_report(args.out, results=results)
    print(verdict_table(results))
    print(f"\nreport: {paths['report.html']}")
    return 0
