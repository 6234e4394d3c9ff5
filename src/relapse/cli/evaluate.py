"""``relapse eval``: metrics of one model, optionally after an attack applied in memory."""

from __future__ import annotations

import argparse
from pathlib import Path

from relapse.cli.common import add_common_training, add_overwrite, run_context

HELP = "measure forgetting and utility: VerbMem, KnowMem, PrivLeak, MIAs, perplexity"


def add(commands) -> None:
    from relapse.metrics.engine import DEFAULT_METRICS, GROUPS

    groups = "; ".join(f"{name} = {', '.join(names)}" for name, names in GROUPS.items() if name != "mia")
    p = commands.add_parser(
        "eval",
        help=HELP,
        description="Compute metrics of a model on a benchmark folder, optionally after an attack applied "
        "in memory (the weights on disk are not changed), print a table and write a JSON record. Metric "
        f"groups: {groups}; mia = LOSS, zlib, lowercase, Min-K%% and Min-K%%++ AUCs. See docs/metrics.md.",
    )
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--data", required=True, type=Path, help="benchmark folder")
    p.add_argument(
        "--metrics",
        default=None,
        help=f"comma-separated metric names or groups (default {DEFAULT_METRICS}; privleak only with a "
        "retrained reference)",
    )
    p.add_argument("--attack", default=None, help="evaluate after this attack, e.g. rtn-w4-g128")
    p.add_argument("--calibration", type=Path, default=None, help="calibration text for GPTQ/AWQ attacks")
    p.add_argument("--retrained", default=None, help="the retrained model, PrivLeak's reference")
    p.add_argument(
        "--retrained-auc",
        default=None,
        help="PrivLeak's reference AUC instead of --retrained: a number, or news / books for MUSE's",
    )
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: from free memory)")
    p.add_argument(
        "--lm-eval",
        default=None,
        metavar="TASKS",
        help="also run these comma-separated lm-evaluation-harness tasks on the same loaded model (after "
        "any --attack): relapse's own relapse_retain_mc, relapse_forget_mc, relapse_holdout_mc (written "
        "from --data), tasks in --lm-eval-include folders, or lm-eval's registry (mmlu, ...; their data "
        "comes from the hub). Needs pip install 'relapse[lm-eval]'",
    )
    p.add_argument(
        "--lm-eval-include",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of lm-eval task YAMLs to search for --lm-eval tasks (repeatable)",
    )
    p.add_argument(
        "--lm-eval-fewshot",
        type=int,
        default=None,
        help="few-shot examples per lm-eval task (default: the task's)",
    )
    p.add_argument(
        "--lm-eval-limit",
        type=int,
        default=None,
        help="at most this many documents per lm-eval task (a quick check)",
    )
    p.add_argument("--out", type=Path, default=Path("eval.json"), help="JSON record (default ./eval.json)")
    add_overwrite(p, "an existing --out")
    p.add_argument("--seed", type=int, default=0, help="seed for noise and relearning attacks (default 0)")
    add_common_training(p)
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    from relapse.errors import ConfigError
    from relapse.metrics.run import format_results, run_eval

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    harness = None
    if args.lm_eval is not None:
        from relapse.metrics.harness import LmEvalRequest

        harness = LmEvalRequest(
            args.lm_eval, tuple(args.lm_eval_include), args.lm_eval_fewshot, args.lm_eval_limit
        )
    elif args.lm_eval_include or args.lm_eval_fewshot is not None or args.lm_eval_limit is not None:
        raise ConfigError("--lm-eval-include, --lm-eval-fewshot and --lm-eval-limit need --lm-eval TASKS")
    record = run_eval(
        args.model,
        args.data,
        args.metrics,
        out=args.out,
        attack=args.attack,
        retrained=args.retrained,
        retrained_auc=args.retrained_auc,
        batch_size=args.batch_size,
        seed=args.seed,
        run=run_context(args),
        calibration=args.calibration,
        lm_eval=harness,
    )
    title = args.model + (f" after {record['attack']['name']}" if record["attack"] else "")
    print(title)
    print(format_results(record))
    print(f"\nwrote {args.out}")
    return 0
