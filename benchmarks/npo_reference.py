"""NPO/KLR with the reference precomputed once vs a frozen reference model in memory: peak memory and
step time, each mode in a fresh process, in one run. Prints ratios against the reference-model baseline.

    python benchmarks/npo_reference.py [--hidden 768 --layers 12] [--steps 4] [--threads 1]

The default model is a random ~90M-parameter Llama (the word-level vocabulary of the built-in benchmark
keeps embeddings small, so nearly all parameters sit in the decoder).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relapse.runtime import RunContext


def child(model: str, data: str, method: str, reference: str, steps: int, threads: int) -> None:
    from relapse.methods.unlearn import UnlearnConfig, unlearn_model

    started = time.perf_counter()
    config = UnlearnConfig(
        method=method, reference=reference, max_steps=steps, eval_every=10_000, batch_size=8
    )
    with tempfile.TemporaryDirectory() as out:
        result = unlearn_model(
            model, data, Path(out) / "u", config, run=RunContext(threads=threads, progress=False)
        )
    total = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_s": result.record["wall_time_s"] / steps, "total_s": total, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, data, method, reference = args.child
        child(model, data, method, reference, args.steps, args.threads)
        return

    from relapse.data import load_benchmark, synth_benchmark
    from relapse.models import TinyConfig, build_tiny, save_model

    with tempfile.TemporaryDirectory() as tmp:
        data, model_dir = Path(tmp) / "data", Path(tmp) / "model"
        synth_benchmark(people=100).save(data)
        tiny = TinyConfig(
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.hidden // 64,
            intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        )
        model, tokenizer = build_tiny(tiny, load_benchmark(data), seed=0)
        params = sum(p.numel() for p in model.parameters())
        save_model(model, tokenizer, model_dir)
        del model
        print(
            f"random Llama, {params / 1e6:.0f}M parameters; "
            f"{args.steps} steps, batch 8, {args.threads} thread(s)"
        )
        print(
            f"{'method':<9} {'reference':<11} {'s/step':>7} {'total s':>8} {'peak MB':>8} "
            f"{'step x':>7} {'memory x':>8}"
        )
        for method in ("npo", "npo+klr"):
            rows = {}
            for reference in ("model", "precompute"):
                output = (
                    subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--steps",
                            str(args.steps),
                            "--threads",
                            str(args.threads),
                            "--child",
                            str(model_dir),
                            str(data),
                            method,
                            reference,
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    .stdout.strip()
                    .splitlines()[-1]
                )
                rows[reference] = json.loads(output)
            base = rows["model"]
            for reference, row in rows.items():
                print(
                    f"{method:<9} {reference:<11} {row['step_s']:>7.2f} {row['total_s']:>8.1f} "
                    f"{row['peak_mb']:>8.0f} {row['step_s'] / base['step_s']:>6.2f}x "
                    f"{row['peak_mb'] / base['peak_mb']:>7.2f}x"
                )


if __name__ == "__main__":
    main()
