"""Steps and wall time for a tiny target model to reach QA recall >= 0.95 on a built-in benchmark.

python benchmarks/memorise.py --people 200 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from relapse.data import synth_benchmark
from relapse.runtime import RunContext
from relapse.training.finetune import TrainConfig, train_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=200)
    parser.add_argument("--facts-per-person", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synth_benchmark(people=args.people, facts_per_person=args.facts_per_person).save(data)
        config = TrainConfig(eval_every=args.eval_every, max_steps=args.max_steps)
        started = time.perf_counter()
        result = train_model(
            data, Path(tmp) / "model", config, run=RunContext(threads=args.threads, progress=False)
        )
        wall = time.perf_counter() - started
    record = result.record
    print(
        f"people {args.people} x {args.facts_per_person} facts, threads {record['threads']}: "
        f"{record['steps']} steps, {wall:.0f} s wall ({record['wall_time_s']:.0f} s in the loop), "
        f"recall forget {record['final']['recall_forget']:.3f} "
        f"retain {record['final']['recall_retain']:.3f}, "
        f"reached 0.95: {record['stopped_early']}"
    )


if __name__ == "__main__":
    main()
