"""``relapse diff``: weight diagnostics of an unlearning update under a quantizer (nothing evaluated)."""

from __future__ import annotations

import argparse
from pathlib import Path

from relapse.cli.common import add_attack_targets, add_overwrite

HELP = "weight diagnostics of an unlearning update under a quantizer (no evaluation)"


def add(commands) -> None:
    p = commands.add_parser(
        "diff",
        help=HELP,
        description="Compare model B (e.g. unlearned) with model A (e.g. the target) under an RTN "
        "quantizer: mean |dW|, |dW| relative to the quantization step, the share of integer codes that "
        "differ between Q(A) and Q(B), and the projection <Q(B)-Q(A), B-A>/||B-A||^2 (1: rounding keeps "
        "the update; 0: it erases it), per weight tensor and in total.",
    )
    p.add_argument("--a", required=True, help="the reference model, e.g. the target")
    p.add_argument("--b", required=True, help="the changed model, e.g. the unlearned one")
    p.add_argument("--attack", default="rtn-w4-g128", help="RTN quantizer name (default rtn-w4-g128)")
    add_attack_targets(p)
    p.add_argument("--json", type=Path, default=None, help="also write the full report here")
    add_overwrite(p, "an existing --json file")
    p.add_argument("--per-tensor", action="store_true", help="print every tensor, not only the total")
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    from relapse.attacks.materialize import diff_models
    from relapse.errors import ConfigError
    from relapse.runtime import atomic_write_json

    if args.json and args.json.exists() and not args.overwrite:  # before any work
        raise ConfigError(f"--json {args.json} exists; pass --overwrite to replace it")
    report = diff_models(args.a, args.b, args.attack, args.include_embeddings, args.include_lm_head)
    rows = list(report["per_tensor"].items()) if args.per_tensor else []
    rows.append(("total", report["total"]))
    width = max(len(name) for name, _ in rows)
    print(
        f"{'tensor':<{width}} {'mean|dW|':>10} {'|dW|/step':>10} {'<step/2':>8} "
        f"{'codes chg':>10} {'projection':>10}"
    )
    for name, row in rows:
        projection = "n/a" if row["projection"] is None else f"{row['projection']:.3f}"
        print(
            f"{name:<{width}} {row['mean_abs_dw']:>10.3g} {row['mean_dw_over_step']:>10.3g} "
            f"{row['share_below_half_step']:>8.1%} {row['codes_changed']:>10.2%} {projection:>10}"
        )
    if args.json:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0
