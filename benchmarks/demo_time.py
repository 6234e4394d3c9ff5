"""The demo's time, cold and warm, in one process against --jobs processes, measured in one run.

    python benchmarks/demo_time.py [--fast] [--jobs 2] [--out DIR]

Runs `relapse demo` four times, each into a fresh cache and output folder except the warm runs, which
reuse their cold run's: cold with ``--jobs 1``, warm with ``--jobs 1``, cold with ``--jobs N``, warm with
``--jobs N``. Prints wall and CPU seconds of each, the ratio of one process's wall time to N's, checks
that both audits hold the same numbers in every cell, and compares with the speed budget (cold <= 10 min,
warm <= 2 min 30 s on 2 cores). Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relapse.audit.results import load_results

BUDGET_S = {"cold": 600.0, "warm": 150.0}


def run_demo(out: Path, cache: Path, jobs: int, fast: bool) -> tuple[float, float]:
    """One `relapse demo`; returns (wall seconds, CPU seconds of it and its worker processes)."""
    command = [sys.executable, "-m", "relapse", "demo", "--out", str(out), "--quiet", "--jobs", str(jobs)]
    command += ["--fast"] if fast else []
    env = {**os.environ, "RELAPSE_CACHE": str(cache)}
    before = os.times()
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = os.times()
    return wall, (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )


def cell_values(out: Path) -> dict[str, dict[str, float]]:
    results = load_results(out / "audit")
    return {
        key: {name: metric["value"] for name, metric in cell["metrics"].items()}
        for key, cell in results["cells"].items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="the small demo (demo-fast.yaml)")
    parser.add_argument("--jobs", type=int, default=2, help="processes of the parallel runs (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="where to keep the runs (default: a temp dir)")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="relapse-demo-time-"))
    times: dict[tuple[int, str], tuple[float, float]] = {}
    for jobs in (1, args.jobs):
        out, cache = root / f"jobs{jobs}" / "out", root / f"jobs{jobs}" / "cache"
        for phase in ("cold", "warm"):
            times[jobs, phase] = run_demo(out, cache, jobs, args.fast)
            wall, cpu = times[jobs, phase]
            print(f"--jobs {jobs} {phase}: {wall:7.1f} s wall, {cpu:7.1f} s CPU", flush=True)
    for phase in ("cold", "warm"):
        one, many = times[1, phase][0], times[args.jobs, phase][0]
        verdict = "within" if many <= BUDGET_S[phase] else "OVER"
        print(
            f"{phase}: --jobs 1 / --jobs {args.jobs} wall = {one / many:.2f}x; "
            f"--jobs {args.jobs} {many:.0f} s is {verdict} the budget of {BUDGET_S[phase]:.0f} s"
        )
    same = cell_values(root / "jobs1" / "out") == cell_values(root / f"jobs{args.jobs}" / "out")
    print(f"every audit cell equal in both: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
