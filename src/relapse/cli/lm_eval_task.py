"""``relapse data lm-eval-task``: write relapse's lm-evaluation-harness tasks from a benchmark folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from relapse.cli.common import add_overwrite

HELP = "write lm-evaluation-harness multiple-choice tasks from a benchmark's QA answer variants"


def add(subparsers) -> None:
    from relapse.data.lm_eval_task import TASK_SPLITS

    p = subparsers.add_parser(
        "lm-eval-task",
        help=HELP,
        description="Write one lm-evaluation-harness multiple-choice task per QA split (a task YAML and a "
        "JSONL data file): the question, the paraphrased answer as the correct choice and the perturbed "
        "answers as distractors. Run them with lm-eval's own command (--include_path DIR) on any model; "
        "relapse eval --lm-eval writes them from --data by itself. See docs/metrics.md.",
    )
    p.add_argument("--data", required=True, type=Path, help="benchmark folder with answer variants")
    p.add_argument("--out", required=True, type=Path, help="folder to write the tasks to")
    p.add_argument(
        "--splits",
        default=None,
        help=f"comma-separated QA splits (default: each of {', '.join(TASK_SPLITS)} whose pairs all have "
        "answer variants)",
    )
    add_overwrite(p, "task files already in --out")
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    """Write the tasks unless one of their files is already in ``--out`` (without ``--overwrite``)."""
    from relapse.data.benchmark import load_benchmark
    from relapse.data.lm_eval_task import TASK_SPLITS, task_name, write_lm_eval_tasks
    from relapse.errors import ConfigError

    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a folder")
    benchmark = load_benchmark(args.data)
    splits = None if args.splits is None else [s.strip() for s in args.splits.split(",") if s.strip()]
    if not args.overwrite:
        for split in splits or TASK_SPLITS:
            for suffix in (".yaml", ".jsonl"):
                existing = args.out / f"{task_name(split)}{suffix}"
                if existing.exists():
                    raise ConfigError(f"{existing} exists; pass --overwrite to replace it")
    names = write_lm_eval_tasks(benchmark, args.out, splits)
    print(f"wrote {len(names)} lm-eval task{'s' if len(names) > 1 else ''} to {args.out}: {', '.join(names)}")
    print(
        f"run them with: lm_eval --model hf --model_args pretrained=MODEL --include_path {args.out} "
        f"--tasks {','.join(names)}"
    )
    return 0
