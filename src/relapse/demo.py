"""``relapse demo``: the main job on the built-in benchmark, as the shipped experiment file runs it.

Generate the benchmark, train the target (forget + retain) and the retrained reference (retain only),
unlearn with each method of ``experiments/demo.yaml``, audit every model under every attack and write the
report. Models are cached, so a second run only reads. ``--fast`` runs ``demo-fast.yaml``, a smaller
version.
"""

from __future__ import annotations

from pathlib import Path

from relapse.experiment import ExperimentResult, load_experiment, run_experiment, shipped_experiment


def run_demo(
    out: str | Path,
    fast: bool = False,
    threads: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    log=print,
    device: str | None = None,
    jobs: int | None = None,
    seeds: int | None = None,
) -> ExperimentResult:
    """Run the shipped demo experiment into ``out`` (on ``device``; ``None``: a GPU when there is one) with
    ``jobs`` processes (``None``: both cores of a 2-core CPU, see :func:`relapse.workers.default_jobs`)."""
    experiment = load_experiment(shipped_experiment("demo-fast" if fast else "demo"))
    return run_experiment(
        experiment,
        out,
        threads=threads,
        progress=progress,
        overwrite=overwrite,
        log=log,
        device=device,
        jobs=jobs,
        seeds=seeds,
    )
