"""Options and summaries shared by several commands (only argparse here: ``relapse --help`` stays light).

The run options (``--device``, ``--threads``, ``--quiet``, ``--jobs``, ``--seeds``) are not fields of any
model's config: they change where and how fast work runs, never its result, so they stay plain argparse.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_common_training(p: argparse.ArgumentParser) -> None:
    """The options every command that runs a model shares: where (--device), how many threads, quiet."""
    p.add_argument(
        "--device",
        default=None,
        metavar="{auto,cpu,cuda,cuda:N}",
        help="where models run (default: auto = the GPU when torch sees one, else the CPU); recorded in "
        "the results, not part of any cache key",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: $RELAPSE_THREADS, else 1 on a machine with <= 2 cores, "
        "else one per core)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")


def add_jobs(p: argparse.ArgumentParser) -> None:
    """--jobs, for the commands that make or audit several independent models."""
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes working on different models at once (default: $RELAPSE_JOBS, else one per core "
        "on a CPU with <= 2 cores, else 1); the results do not depend on it",
    )


def add_seeds(p: argparse.ArgumentParser) -> None:
    """--seeds, for the commands that run an experiment."""
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="repeat every unlearning run with this many seeds (seed, seed + 1, ...), audit each, and "
        "report the spread over seeds (default: the experiment file's seeds, else 1)",
    )


def add_attack_targets(p: argparse.ArgumentParser) -> None:
    """Which weights beyond the decoder's linear layers an attack (or its diagnostics) touches."""
    p.add_argument("--include-embeddings", action="store_true", help="also attack the input embeddings")
    p.add_argument("--include-lm-head", action="store_true", help="also attack the LM head")


def add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    """--overwrite: results are never replaced without it; ``what`` says what it replaces."""
    p.add_argument("--overwrite", action="store_true", help=f"replace {what}")


def run_summary(result: Any, done_before: str) -> str:
    """``N steps in T s; QA recall forget F, retain R`` for a train or unlearn result."""
    record = result.record
    how = done_before if result.cached else f"{record['steps']} steps in {record['wall_time_s']:.0f} s"
    final = record["final"]
    return f"{how}; QA recall forget {final['recall_forget']:.3f}, retain {final['recall_retain']:.3f}"


def add_experiment_options(p: argparse.ArgumentParser) -> None:
    """The options of the commands that run a whole experiment (``run``, ``demo``): overwrite, threads,
    device, quiet, processes and seeds."""
    add_overwrite(p, "an audit with other settings in --out")
    add_common_training(p)
    add_jobs(p)
    add_seeds(p)


def run_context(args: argparse.Namespace):
    """How a command runs, from its options: ``--threads``, ``--quiet`` (no bars, no log lines),
    ``--overwrite`` and ``--device`` (None where the command has no such option)."""
    from relapse.runtime import RunContext

    return RunContext(
        threads=getattr(args, "threads", None),
        progress=not args.quiet,
        overwrite=getattr(args, "overwrite", False),
        log=None if args.quiet else print,
        device=getattr(args, "device", None),
    )
