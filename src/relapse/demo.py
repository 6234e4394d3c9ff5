"""``relapse demo``: the main job on the built-in benchmark, as the shipped experiment file runs it.

Generate the benchmark, train the target (forget + retain) and the retrained reference (retain only),
unlearn with each method of ``experiments/demo.yaml``, audit every model under every attack and write the
report. Models are cached, so a second run only reads. ``--fast`` runs ``demo-fast.yaml``, a smaller
version.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from relapse.experiment import ExperimentResult, load_experiment, run_experiment, shipped_experiment

if TYPE_CHECKING:
    from relapse.runtime import RunContext


def run_demo(
    out: str | Path,
    fast: bool = False,
    run: RunContext | None = None,
    jobs: int | None = None,
    seeds: int | None = None,
) -> ExperimentResult:
    """Run the shipped demo experiment into ``out`` (on ``run.device``; ``None``: a GPU when there is one)
    with ``jobs`` processes (``None``: both cores of a 2-core CPU, see
    :func:`relapse.workers.default_jobs`)."""
    experiment = load_experiment(shipped_experiment("demo-fast" if fast else "demo"))
    return run_experiment(
        experiment,
        out,
        run,
        jobs=jobs,
        seeds=seeds,
    )


def models_table(result: ExperimentResult) -> str:
    """The trained and unlearned models with their QA recall, one row each."""
    header = (
        f"{'model':<14} {'made by':<30} {'steps':>6} {'seconds':>8} {'cached':>7} {'forget':>7} {'retain':>7}"
    )
    lines = [header, "-" * len(header)]
    for label, row in result.models.items():
        final = row["final"]
        lines.append(
            f"{label:<14} {row['how']:<30} {row['steps'] or 0:>6} {row['seconds'] or 0:>8.1f} "
            f"{'yes' if row['cached'] else 'no':>7} {final.get('recall_forget', float('nan')):>7.3f} "
            f"{final.get('recall_retain', float('nan')):>7.3f}"
        )
    return "\n".join(lines)


def verdict_table(results: dict) -> str:
    """One line per unlearned model: the audit's answer and why."""
    rows = [(label, v["status"], v["text"]) for label, v in results.get("verdicts", {}).items()]
    width = max([len("model"), *(len(label) for label, _, _ in rows)])
    lines = [f"{'model':<{width}}  {'verdict':<14}  why", "-" * (width + 66)]
    lines += [f"{label:<{width}}  {status:<14}  {text}" for label, status, text in rows]
    return "\n".join(lines)
