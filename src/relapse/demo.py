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
