"""Each unlearning method on a built-in benchmark: steps and time to forget recall <= 0.3, retain recall
then, and mean |dW|. The target model is trained (or taken from the cache) first.

    python benchmarks/methods.py [--people 200] [--lr 3e-5] [--alpha 5] [--threads 1] [--methods ga npo]
    python benchmarks/methods.py --select-lr 1e-4 3e-5   # utility-preserving selection per method

With ``--select-lr`` each method sweeps those rates and the table adds the chosen rate and the cost of
the sweep as a ratio to the chosen run alone (measured in the same run).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from relapse.data import synth_benchmark
from relapse.methods.registry import method_names
from relapse.methods.unlearn import UnlearnConfig, unlearn_model
from relapse.runtime import RunContext
from relapse.training.finetune import TrainConfig, train_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--alpha", type=float, default=5.0)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sure-lr", type=float, default=1e-3, help="SURE trains few weights at a large lr")
    parser.add_argument("--methods", nargs="+", default=None, help="method names (default: all)")
    parser.add_argument("--select-lr", type=float, nargs="+", default=None, help="rates to select from")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synth_benchmark(people=args.people).save(data)
        target = train_model(
            data, None, TrainConfig(eval_every=50), run=RunContext(threads=args.threads, progress=False)
        )
        print(
            f"target: {target.record['steps']} steps, {target.record['wall_time_s']:.0f} s, "
            f"recall {target.record['final']}"
        )
        runs = [(m, {"lr": args.lr}) for m in args.methods or method_names()]
        if args.methods is None:
            runs.append(("npo+gdr", {"lr": args.sure_lr, "sure_top": 0.1}))
            runs.append(("npo+gdr", {"lr": args.sure_lr, "sure_top": 0.1, "sure_granularity": "neuron"}))
        if args.select_lr:
            runs = [(m, {**extra, "select_lr": args.select_lr}) for m, extra in runs]
        header = f"{'method':<24} {'steps':>5} {'seconds':>8} {'forget':>7} {'retain':>7} {'mean|dW|':>10}"
        print(header + (f" {'chosen lr':>9} {'sweep/run':>9}" if args.select_lr else ""))
        for method, extra in runs:
            config = UnlearnConfig(
                method=method,
                alpha=args.alpha,
                max_steps=args.max_steps,
                eval_every=5,
                stop_forget_recall=0.3,
                **extra,
            )
            result = unlearn_model(
                target.path,
                data,
                Path(tmp) / "u",
                config,
                run=RunContext(threads=args.threads, progress=False, overwrite=True),
            )
            r = result.record
            label = method + (
                f" sure{extra['sure_top']}-{config.sure_granularity}" if "sure_top" in extra else ""
            )
            line = (
                f"{label:<24} {r['steps']:>5} {r['wall_time_s']:>8.1f} {r['final']['recall_forget']:>7.3f} "
                f"{r['final']['recall_retain']:>7.3f} {r['weight_change']['mean_abs']:>10.2e}"
            )
            if "selection" in r:
                sweep = r["selection"]
                line += f" {sweep['chosen_lr']:>9.0e} {sweep['seconds'] / r['wall_time_s']:>8.1f}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
