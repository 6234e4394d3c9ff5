"""``relapse demo``: the main job on the built-in benchmark.

For now: generate the benchmark, train (or fetch from the cache) the target model on forget + retain and
the retrained reference on retain only, and report QA recall of both on both splits. The retrained model
is the gold standard an unlearned model is compared to: it never saw the forget people.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relapse.data.benchmark import load_benchmark
from relapse.data.synth import synth_benchmark
from relapse.errors import ConfigError
from relapse.models.train import TrainConfig, train_model
from relapse.runtime import atomic_write_json, package_versions

#: (people, facts per person, recall check cadence) of the full and the --fast demo.
DEMO_SIZES = {"full": (100, 5, 50), "fast": (30, 3, 25)}


@dataclass
class DemoSummary:
    """Results of a demo run: one row per trained model."""

    rows: list[dict[str, Any]]
    summary_path: Path

    def table(self) -> str:
        header = (
            f"{'model':<10} {'trained on':<14} {'steps':>6} {'seconds':>8} {'cached':>7} "
            f"{'forget recall':>14} {'retain recall':>14}"
        )
        lines = [header, "-" * len(header)]
        for row in self.rows:
            lines.append(
                f"{row['model']:<10} {row['trained_on']:<14} {row['steps']:>6} {row['seconds']:>8.1f} "
                f"{'yes' if row['cached'] else 'no':>7} "
                f"{row['recall_forget']:>14.3f} {row['recall_retain']:>14.3f}"
            )
        return "\n".join(lines)


def run_demo(
    out: str | Path, fast: bool = False, seed: int = 0, threads: int | None = None, progress: bool = True
) -> DemoSummary:
    """Run the demo into ``out`` (benchmark in ``out/data``, summary in ``out/demo.json``).

    Trained models live in the cache (``$RELAPSE_CACHE``), so a second run is fast.
    """
    out = Path(out)
    people, facts, eval_every = DEMO_SIZES["fast" if fast else "full"]
    benchmark = synth_benchmark(people=people, facts_per_person=facts, seed=seed)
    data_dir = out / ("data-fast" if fast else "data")
    meta_path = data_dir / "meta.json"
    if meta_path.exists():
        if json.loads(meta_path.read_text(encoding="utf-8")) != benchmark.meta:
            raise ConfigError(f"{data_dir} holds a different benchmark; remove it or choose another --out")
        load_benchmark(data_dir)
    else:
        benchmark.save(data_dir)

    rows = []
    for name, on in (("target", "forget+retain"), ("retrained", "retain")):
        config = TrainConfig(on=on, seed=seed, eval_every=eval_every)
        started = time.perf_counter()
        result = train_model(data_dir, None, config, threads=threads, progress=progress)
        record = result.record
        rows.append(
            {
                "model": name,
                "trained_on": on,
                "path": str(result.path),
                "cached": result.cached,
                "steps": record["steps"],
                "seconds": record["wall_time_s"] if not result.cached else time.perf_counter() - started,
                "train_seconds": record["wall_time_s"],
                **record["final"],
            }
        )
    summary_path = out / "demo.json"
    atomic_write_json(
        summary_path,
        {
            "kind": "relapse-demo",
            "fast": fast,
            "seed": seed,
            "data": str(data_dir),
            "benchmark": benchmark.meta,
            "models": rows,
            "versions": package_versions(),
        },
    )
    return DemoSummary(rows, summary_path)
