"""The robustness table on the tiny model: which unlearning method survives its own audit?

On tiny models trained from scratch in float32, 4-bit rounding brings nothing back (the demo's
finding), so a table there cannot tell a robust method from another. This script builds the regime
where rounding does undo unlearning (docs/study-smollm2.md): a base model whose weights sit on a 4-bit
grid (a tiny Llama trained on the retain people, then stored as RTN 4-bit with groups of 64), a target
fine-tuned from it on forget + retain, the retrained model fine-tuned from it on retain only, and each
unlearning method tuned by selection (``select_lr``). The audit then quantizes onto that base grid
(``rtn-w4-g64``) and onto others, relearns, and adds a noise control.

    python benchmarks/robustness.py --out results/robustness-tiny [--threads 1]

Writes ``OUT/table.json`` and ``OUT/table.md``: per method, float forget / retain recall and forget NLL;
per 4-bit attack and the noise control, the share of the forget-answer NLL gap kept between the
quantized target and the quantized unlearned model (1: kept; 0: the quantized models are alike), with the
quantized target's forget recall as its guard; the relearning attacks' recovered share of the recall gap
(net of the retrained control); seconds per unlearning step; and whether the row meets the bar a robust
method must clear (retain >= 0.9x the target's, forget <= the retrained model's + 0.1, >= 90% of the gap
kept under every 4-bit attack, relearning recovery no worse than NPO+GDR's; see docs/robustness.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from relapse.attacks.materialize import materialize
from relapse.audit.recovery import NO_ATTACK, cell_value
from relapse.audit.results import load_results
from relapse.data import synth_benchmark
from relapse.experiment import parse_experiment, run_experiment
from relapse.runtime import RunContext, atomic_write_json, atomic_write_text, package_versions
from relapse.training.finetune import TrainConfig, train_model

BASE_GRID = "rtn-w4-g64"
QUANTIZERS = ["rtn-w4-ch", BASE_GRID, "gptq-w4-g64", "bnb-fp4", "bnb-nf4"]
NOISE = f"noise-like-{BASE_GRID}"
RELEARN = ["relearn-retain-25", "relearn-forget-half-25"]
ROBUST_GRIDS = ["rtn-w4-ch", BASE_GRID, "rtn-w4-g128", "bnb-nf4", "bnb-fp4"]
SELECT = [1e-4, 3e-5]
ROWS: dict[str, dict[str, Any]] = {
    "npo+gdr": {"method": "npo+gdr"},
    "npo+gdr-bf16": {"method": "npo+gdr", "weights": "bfloat16-emulated"},
    "sure": {"method": "npo+gdr", "sure_top": 0.1, "select_lr": [1e-3, 3e-4]},
    "simnpo+gdr": {"method": "simnpo+gdr", "select_lr": [3e-4, 1e-4]},
    "rmu": {"method": "rmu", "alpha": 10, "select_lr": [3e-3, 1e-3]},
    "npo+gdr-sam": {"method": "npo+gdr", "sam_rho": 0.05},
    "npo+gdr-robust": {"method": "npo+gdr", "robust_to": ROBUST_GRIDS},
    "npo+gdr-robust-base": {"method": "npo+gdr", "robust_to": [BASE_GRID]},
    "npo+gdr-robust-sam": {"method": "npo+gdr", "robust_to": ROBUST_GRIDS, "sam_rho": 0.05},
    # The margin term: every moved weight pushed across the edge of the target's cell (uniform grids).
    "npo+gdr-robust-base-margin": {"method": "npo+gdr", "robust_to": [BASE_GRID], "robust_margin": 100.0},
    "npo+gdr-robust-margin": {"method": "npo+gdr", "robust_to": ROBUST_GRIDS, "robust_margin": 100.0},
}


def build_base(data: Path, out: Path, threads: int | None, seed: int = 0) -> Path:
    """The tiny base model (trained on the retain people) stored on the 4-bit grid."""
    base = train_model(
        data,
        None,
        TrainConfig(on="retain", eval_every=25, seed=seed),
        run=RunContext(threads=threads, progress=False),
    )
    path, _, _ = materialize(
        str(base.path), BASE_GRID, out, run=RunContext(threads=threads, progress=False, device="cpu")
    )
    return Path(path)


def experiment(base: Path, seed: int = 0) -> dict[str, Any]:
    return {
        "name": "robustness-tiny",
        "seed": seed,
        "device": "cpu",
        "data": {"synth": {"people": 60, "facts_per_person": 3, "forget_frac": 0.2}},
        "train": {"base": str(base), "lr": 3e-4, "max_steps": 300, "warmup_steps": 0, "eval_every": 10},
        "unlearn": {
            "defaults": {
                "batch_size": 16,
                "max_steps": 60,
                "eval_every": 5,
                # The bar asks for forget recall at most the retrained model's + 0.1 (0.06 + 0.1 here).
                "stop_forget_recall": 0.15,
                "select_lr": SELECT,
            },
            "runs": ROWS,
        },
        "audit": {"attacks": [*QUANTIZERS, NOISE, *RELEARN], "metrics": ["recall", "nll"]},
    }


def table(results: dict[str, Any], models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    recovery = results["recovery"]
    target, retrained = "target", "retrained"

    def value(model: str, attack: str, metric: str) -> float | None:
        return cell_value(results, model, attack, metric)

    rows = {}
    for label in (name for name in ROWS if name in models):
        record = json.loads((Path(models[label]["path"]) / "unlearn.json").read_text())
        per_step = record["wall_time_s"] / max(1, record["steps"])
        kept = {a: recovery[label][a].get("nll_forget:kept") for a in [*QUANTIZERS, NOISE]}
        relearn = {
            a: {
                "recovered": recovery[label][a].get("recall_forget"),
                "control": recovery[label][a].get("recall_forget:control"),
            }
            for a in RELEARN
        }
        rows[label] = {
            "lr": (record.get("selection") or {}).get("chosen_lr", record["config"]["lr"]),
            "steps": record["steps"],
            "seconds_per_step": per_step,
            "forget": value(label, NO_ATTACK, "recall_forget"),
            "retain": value(label, NO_ATTACK, "recall_retain"),
            "nll_forget": value(label, NO_ATTACK, "nll_forget"),
            "kept": kept,
            "relearn": relearn,
            "moved_share": record["weight_change"]["moved_share"],
            # How far unlearning moved the weights on the base grid, and how many of its codes it changed.
            "diagnostics": {
                key: (results.get("diagnostics", {}).get(label, {}).get(BASE_GRID) or {}).get(key)
                for key in ("mean_dw_over_step", "codes_changed")
            },
        }
    guard = {a: value(target, a, "recall_forget") for a in [*QUANTIZERS, NOISE]}
    reference = rows["npo+gdr"]["relearn"]
    target_retain = value(target, NO_ATTACK, "recall_retain")
    retrained_forget = value(retrained, NO_ATTACK, "recall_forget")
    for row in rows.values():
        row["bar"] = {
            "utility": row["retain"] >= 0.9 * target_retain,
            "forgets": row["forget"] <= retrained_forget + 0.1,
            "quantization": all((row["kept"][a] or 0.0) >= 0.9 for a in QUANTIZERS),
            "relearning": all(
                (row["relearn"][a]["recovered"] or 0.0) <= (reference[a]["recovered"] or 0.0) + 1e-9
                for a in RELEARN
            ),
        }
        row["robust"] = all(row["bar"].values())
    return {
        "target": {
            "forget": value(target, NO_ATTACK, "recall_forget"),
            "retain": target_retain,
            "nll_forget": value(target, NO_ATTACK, "nll_forget"),
            "quantized_forget": guard,
        },
        "retrained": {"forget": retrained_forget, "retain": value(retrained, NO_ATTACK, "recall_retain")},
        "rows": rows,
    }


def markdown(summary: dict[str, Any]) -> str:
    target = summary["target"]
    lines = [
        "# Robustness on the tiny model (base-grid regime)",
        "",
        f"Target: forget {target['forget']:.2f}, retain {target['retain']:.2f}, forget NLL "
        f"{target['nll_forget']:.2f}; retrained: forget {summary['retrained']['forget']:.2f}, retain "
        f"{summary['retrained']['retain']:.2f}. The quantized target's forget recall (the guard: a share "
        "kept means little where it falls): "
        + ", ".join(f"{a} {v:.2f}" for a, v in target["quantized_forget"].items())
        + ".",
        "",
        "Share of the forget-NLL gap kept (1 = kept, 0 = the quantized unlearned model answers like the "
        "quantized target); relearning: recovered share of the recall gap (retrained control).",
        "",
    ]
    header = [
        "method",
        "lr",
        "steps",
        "forget",
        "retain",
        "NLL",
        *QUANTIZERS,
        "noise",
        *RELEARN,
        "s/step",
        "abs(dW)/step",
        "codes changed",
        "bar",
    ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for label, row in summary["rows"].items():
        kept = [("n/a" if row["kept"][a] is None else f"{row['kept'][a]:.2f}") for a in [*QUANTIZERS, NOISE]]
        relearn = []
        for a in RELEARN:
            r = row["relearn"][a]
            shown = "n/a" if r["recovered"] is None else f"{r['recovered']:.0%}"
            control = "" if r["control"] is None else f" ({r['control']:.0%})"
            relearn.append(shown + control)
        failed = [k for k, ok in row["bar"].items() if not ok]
        diagnostics = row["diagnostics"]
        bar = "robust" if row["robust"] else "no: " + ", ".join(failed)
        lines.append(
            f"| {label} | {row['lr']:g} | {row['steps']} | {row['forget']:.2f} | {row['retain']:.2f} | "
            f"{row['nll_forget']:.2f} | "
            + " | ".join(kept)
            + " | "
            + " | ".join(relearn)
            + f" | {row['seconds_per_step']:.2f} | {_number(diagnostics['mean_dw_over_step'], '.3f')} | "
            f"{_number(diagnostics['codes_changed'], '.2%')} | {bar} |"
        )
    return "\n".join(lines) + "\n"


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=None, help="processes (default: relapse's, see --jobs)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the benchmark, the base model and the experiment (default 0; the committed table's)",
    )
    parser.add_argument(
        "--table-only", action="store_true", help="run nothing: rebuild the table from OUT's finished run"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        record = json.loads((args.out / "run" / "experiment.json").read_text())
        results = load_results(args.out / "run" / "audit")
        summary = {
            **table(results, record["models"]),
            "experiment": record["experiment"],
            "seed": record["seed"],
            "versions": record["versions"],
        }
        atomic_write_json(args.out / "table.json", summary)
        atomic_write_text(args.out / "table.md", markdown(summary))
        print(markdown(summary))
        return
    spec = experiment(Path("placeholder"), args.seed)
    data = args.out / "bench"
    synth_benchmark(seed=spec["seed"], **spec["data"]["synth"]).save(data)
    base = build_base(data, args.out / f"base-{BASE_GRID}", args.threads, args.seed)
    spec = experiment(base, args.seed)
    spec["data"] = {"path": str(data)}
    result = run_experiment(
        parse_experiment(spec, "robustness-tiny"),
        args.out / "run",
        jobs=args.jobs,
        run=RunContext(threads=args.threads, progress=False),
    )
    summary = table(result.results, result.models)
    summary.update(experiment=spec, seed=spec["seed"], versions=package_versions())
    atomic_write_json(args.out / "table.json", summary)
    atomic_write_text(args.out / "table.md", markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
