"""Where does the paper's relapse begin? A grid of pretrain -> fine-tune -> unlearn runs on SmolLM2-135M.

Each cell is one experiment (``relapse run``): fine-tune SmolLM2-135M on the built-in benchmark at a
given strength (learning rate, steps) and weight precision, unlearn at a given learning rate, and audit
target and unlearned model under 4-bit quantization (RTN, GPTQ, bitsandbytes FP4/NF4), the Q4_1 grid the
base weights came from, relearning and a noise control of equal error. Cells share models through the
cache (the target of one fine-tuning setting serves every unlearning setting). The script also measures
the weight diagnostics of fine-tuning itself (base -> target), which the audit does not, and writes:

- ``OUT/study.json``: every cell's numbers (resumable: finished cells are read back, not rerun);
- ``OUT/study.md``: the table the question needs: is there a cell where the quantized unlearned model
  answers like the quantized target while the float unlearned model does not?

    python benchmarks/study_smollm2.py --out study [--grid quick|full] [--device auto]

``quick`` is one fine-tuning setting in float32 (about an hour on 2 CPU cores); ``full`` varies the
fine-tuning learning rate (5e-5, 3e-4, 1e-3), the unlearning learning rate (1e-5, 1e-4) and the weight
precision (float32, bfloat16), which wants a GPU: bfloat16 matrix products are ~25x slower than float32
on a CPU without bfloat16 instructions. ``cpu`` replaces bfloat16 by ``bfloat16-emulated`` (weights,
gradients and Adam moments rounded to bfloat16 after every step, float32 arithmetic) and drops the
weakest fine-tuning. ``cpu-deep`` unlearns with NPO+GDR until forget recall 0.3 (at most 48 steps);
``cpu-bf16-strong`` does that at lr 1e-4 after bfloat16 fine-tuning at lr 1e-3; ``cpu-bf16-robust`` adds
the quantization-robust objective (``--robust-to default``) to that cell. ``--only NAME`` runs
the named cells of a grid. To run cells in parallel, give each process its own ``--out`` and merge them
with ``--collect``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

from relapse.attacks.diagnostics import weight_diagnostics
from relapse.attacks.rtn import parse_rtn_name
from relapse.audit.recovery import NO_ATTACK, cell_key, finish, gap_kept
from relapse.audit.results import load_results
from relapse.experiment import parse_experiment, run_experiment
from relapse.models.io import load_model
from relapse.models.parts import decoder_linear_weights
from relapse.runtime import RunContext, atomic_write_json, atomic_write_text

NOISE_CONTROL = "noise-like-rtn-w4-g64-sym"
QUANTIZERS = ["rtn-w4-g64-sym", "rtn-w4-ch", "gptq-w4-g64", "bnb-fp4", "bnb-nf4", "gguf-q4_1"]
ATTACKS = [*QUANTIZERS, "relearn-retain-25", NOISE_CONTROL]
#: SmolLM2 fine-tuned in bfloat16 at lr 1e-3, then NPO+GDR in bfloat16 at lr 1e-4 until forget recall
#: 0.3 (at most 48 steps): the cell where the relapse shows (docs/study-smollm2.md).
BF16_CELL = {
    "finetune": [(1e-3, 150)],
    "unlearn_lr": [1e-4],
    "weights": ["bfloat16-emulated"],
    "methods": ["npo+gdr"],
    "unlearn_steps": 48,
    "stop_forget_recall": 0.3,
}
#: The rows of the robustness table in that cell, at one learning rate each (selection would double a
#: row's cost on a CPU): the baseline; the robust objective; -fp32, the same unlearning on float32 master
#: weights (the bf16 target's values in float32); SURE at 10x the baseline's rate (the paper's
#: prescription); SimNPO+GDR; RMU; and SAM on NPO+GDR.
BF16_VARIANTS = {
    "": {},
    "-robust": {"robust_to": ["default"]},
    "-fp32": {"weights": "float32"},
    "-sure": {"sure_top": 0.1, "lr": 1e-3},
    "-simnpo": {"method": "simnpo+gdr"},
    "-rmu": {"method": "rmu", "alpha": 10},
    # At the baseline's rate RMU's bfloat16 updates are lost (forget recall stays 1.00 after 48 steps);
    # 10x, as for SURE, is the rate its few MLP weights need.
    "-rmu-10x": {"method": "rmu", "alpha": 10, "lr": 1e-3},
    "-sam": {"sam_rho": 0.05},
}
GRIDS = {
    "quick": {"finetune": [(3e-4, 200)], "unlearn_lr": [1e-5, 1e-4], "weights": ["float32"]},
    "full": {
        "finetune": [(5e-5, 200), (3e-4, 200), (1e-3, 150)],
        "unlearn_lr": [1e-5, 1e-4],
        "weights": ["float32", "bfloat16"],
    },
    # The same question on a CPU: bfloat16 storage emulated in float32 arithmetic (same lost updates).
    "cpu": {
        "finetune": [(3e-4, 200), (1e-3, 150)],
        "unlearn_lr": [1e-5, 1e-4],
        "weights": ["float32", "bfloat16-emulated"],
    },
    # Unlearning run until it forgets (forget recall <= 0.3, at most 48 steps), NPO+GDR only: with
    # bfloat16 storage, 12 steps at lr 1e-5 move ~1% of the weights and forget nothing.
    "cpu-deep": {
        "finetune": [(3e-4, 200)],
        "unlearn_lr": [1e-5, 1e-4],
        "weights": ["float32", "bfloat16-emulated"],
        "methods": ["npo+gdr"],
        "unlearn_steps": 48,
        "stop_forget_recall": 0.3,
    },
    # bfloat16 storage with a fine-tuning strong enough to survive 4-bit RTN (at lr 3e-4 it did not), and
    # the unlearning that forgot in bfloat16 at lr 3e-4 (NPO+GDR at lr 1e-4 until forget recall 0.3).
    "cpu-bf16-strong": BF16_CELL,
    # The relapsing cell above with the quantization-robust objective beside the baseline (the loss also
    # on the weights as RTN per channel, g64 and g128, NF4, FP4 and the base model's Q4_1 grid round
    # them), float32 master weights (the trivial remedy) and the other methods of the robustness table.
    "cpu-bf16-robust": {**BF16_CELL, "variants": BF16_VARIANTS},
    # The bar's reading of that cell: a retrained model (fine-tuned on retain only, for the forget clause
    # and the relearning control) and relearning on half of the forget set. Its rows are read from the
    # cache when cpu-bf16-robust ran on this machine with the same benchmark (``--data``). Learning-rate
    # selection for float32 masters ({1e-4, 5e-5}) and SURE ({1e-3, 5e-4}) chose the rates of the -fp32
    # and -sure rows (docs/robustness.md), so the selected models are those rows' and are not audited twice.
    "cpu-bf16-bar": {
        **BF16_CELL,
        "retrained": True,
        "attacks": [*ATTACKS, "relearn-forget-half-25"],
        "variants": BF16_VARIANTS,
    },
}
UNLEARN_DEFAULTS = {
    "methods": ["ga+gdr", "npo+gdr"],
    "unlearn_steps": 12,
    "stop_forget_recall": None,
    "variants": {"": {}},
}


def cell_experiment(
    finetune_lr: float,
    finetune_steps: int,
    weights: str,
    grid: dict[str, Any],
    device: str | None,
    data: Path | None = None,
) -> dict[str, Any]:
    """One fine-tuning setting with its unlearning runs, as an experiment file's contents; ``data`` is a
    benchmark folder to use instead of generating one (an earlier study's, so its cached models serve)."""
    unlearn = {**UNLEARN_DEFAULTS, **grid}
    steps = unlearn["unlearn_steps"]
    suffix = "" if steps == UNLEARN_DEFAULTS["unlearn_steps"] else f"-u{steps}"
    stop = unlearn["stop_forget_recall"]
    return {
        "name": f"smollm2-ft{finetune_lr:g}-{weights}{suffix}",
        "seed": 0,
        **({"device": device} if device else {}),
        "data": {"path": str(data)} if data else {"synth": {"people": 30, "facts_per_person": 3}},
        "train": {
            "base": "smollm2-135m",
            "lr": finetune_lr,
            "max_steps": finetune_steps,
            "batch_size": 8,
            "warmup_steps": 10,
            "stop_recall": 0.9,
            "eval_every": 20,
            "dtype": weights,
            "retrained": grid.get("retrained", False),
        },
        "unlearn": {
            "defaults": {
                "batch_size": 8,
                "max_steps": steps,
                "eval_every": 4,
                "weights": weights,
                **({"stop_forget_recall": stop} if stop is not None else {}),
            },
            "runs": {
                f"{settings.get('method', method)}-lr{settings.get('lr', lr):g}{tag}": {
                    "method": method,
                    "lr": lr,
                    **settings,
                }
                for method, lr in itertools.product(unlearn["methods"], grid["unlearn_lr"])
                for tag, settings in unlearn["variants"].items()
            },
        },
        "audit": {"attacks": grid.get("attacks", ATTACKS), "metrics": ["recall", "nll"]},
    }


def finetune_diagnostics(base: str, target: str) -> dict[str, Any]:
    """How far fine-tuning moved the decoder weights, on the 4-bit grids of the study."""
    base_model, _ = load_model(base)
    target_model, _ = load_model(target)
    names = sorted(decoder_linear_weights(base_model))
    a, b = base_model.state_dict(), target_model.state_dict()
    return {
        grid: weight_diagnostics(a, b, names, parse_rtn_name(grid))["total"]
        for grid in ("rtn-w4-g64-sym", "rtn-w4-ch", "rtn-w4-g32")
    }


def summarize(name: str, result) -> dict[str, Any]:
    results = result.results
    models = results["models"]
    target = next(label for label, info in models.items() if info["role"] == "target")

    def value(model, attack, metric):
        cell = results["cells"].get(cell_key(model, attack))
        return None if cell is None else cell["metrics"][metric]["value"]

    rows = {}
    for label in models:
        rows[label] = {
            attack: {
                m: value(label, attack, m)
                for m in ("recall_forget", "recall_retain", "nll_forget", "nll_retain")
            }
            for attack in [NO_ATTACK, *results["config"]["attacks"]]
        }
    return {
        "cell": name,
        "models": {label: info["path"] for label, info in models.items()},
        "training": result.models,
        "values": rows,
        "recovery": results.get("recovery", {}),
        "diagnostics_unlearning": results.get("diagnostics", {}),
        "moved_share": moved_shares(results),
        "target": target,
    }


def moved_shares(results: dict[str, Any]) -> dict[str, float]:
    """Share of the weights each unlearning run changed at all (bfloat16 storage loses small updates)."""
    shares = {}
    for label, info in results["models"].items():
        record = Path(info["path"]) / "unlearn.json"
        if info["role"] == "unlearned" and record.is_file():
            shares[label] = json.loads(record.read_text())["weight_change"]["moved_share"]
    return shares


def cell_gap_kept(cell: dict[str, Any], label: str, attack: str) -> float | None:
    """:func:`relapse.audit.recovery.gap_kept` of the forget answers' NLL for one unlearned model of a cell:
    1 = the quantized models differ as the float ones do, 0 = the quantized unlearned model scores like
    the quantized target (the paper's relapse)."""
    values, target = cell["values"], cell["target"]

    def nll(model: str, name: str) -> float | None:
        return (values[model].get(name) or {}).get("nll_forget")

    unlearned, float_target = nll(label, NO_ATTACK), nll(target, NO_ATTACK)
    return gap_kept(nll(target, attack), nll(label, attack), unlearned, float_target, higher_is_better=True)


def markdown(cells: list[dict[str, Any]]) -> str:
    lines = [
        "# SmolLM2-135M: where the quantization relapse begins",
        "",
        "Per cell: forget / retain QA recall of the float model and after each 4-bit quantizer, for the "
        "fine-tuned target and each unlearned model. The question: does a quantized unlearned model answer "
        "like the quantized target while the float unlearned model does not?",
        "",
    ]
    for cell in cells:
        lines += [f"## {cell['cell']}", ""]
        header = ["model", "float", *QUANTIZERS, "noise", "relearn"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for label, per_attack in cell["values"].items():
            row = [label]
            for attack in [NO_ATTACK, *QUANTIZERS, NOISE_CONTROL, "relearn-retain-25"]:
                values = per_attack.get(attack) or {}
                forget, retain = values.get("recall_forget"), values.get("recall_retain")
                row.append("n/a" if forget is None else f"{forget:.2f} / {retain:.2f}")
            lines.append("| " + " | ".join(row) + " |")
        lines += [
            "",
            "Share of the forget-answer NLL gap between target and unlearned model kept under each "
            "quantizer and the noise control (1 = kept, 0 = the quantized models are alike):",
            "",
        ]
        columns = [*QUANTIZERS, NOISE_CONTROL]
        lines.append("| model | " + " | ".join(columns) + " |")
        lines.append("|" + "---|" * (len(columns) + 1))
        for label in cell["values"]:
            if label == cell["target"]:
                continue
            kept = (cell_gap_kept(cell, label, attack) for attack in columns)
            text = ("n/a" if k is None else f"{k:.2f}" for k in kept)
            lines.append(f"| {label} | " + " | ".join(text) + " |")
        lines.append("")
        for label, grids in cell.get("diagnostics_finetune", {}).items():
            text = ", ".join(
                f"{grid}: |dW|/step {d['mean_dw_over_step']:.3g}, codes changed {d['codes_changed']:.1%}, "
                f"projection {d['projection'] if d['projection'] is None else round(d['projection'], 3)}"
                for grid, d in grids.items()
            )
            lines.append(f"- fine-tuning diagnostics ({label}): {text}")
        for label, grids in cell.get("diagnostics_unlearning", {}).items():
            text = ", ".join(
                f"{grid}: |dW|/step {d['mean_dw_over_step']:.3g}, codes changed {d['codes_changed']:.1%}"
                for grid, d in grids.items()
            )
            moved = cell.get("moved_share", {}).get(label)
            moved_text = "" if moved is None else f"; weights changed at all: {moved:.1%}"
            lines.append(f"- unlearning diagnostics ({label}): {text}{moved_text}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="quick")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda (default: relapse's default)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", action="append", default=[], help="run only this cell (repeatable)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="run only this variant of the grid's unlearning runs ('' for the plain one; repeatable)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a benchmark folder to use instead of generating one, e.g. an earlier study's OUT/CELL/data: "
        "its models stay in the cache under the same keys (a benchmark generated by another relapse "
        "version may differ, and then every model is trained again)",
    )
    parser.add_argument(
        "--collect",
        type=Path,
        nargs="+",
        default=None,
        help="run nothing: merge these earlier --out folders' cells into --out (e.g. after parallel runs)",
    )
    args = parser.parse_args()
    grid = GRIDS[args.grid]
    if args.variant:
        variants = {**UNLEARN_DEFAULTS, **grid}["variants"]
        unknown = sorted(set(args.variant) - set(variants))
        if unknown:
            parser.error(f"--variant {unknown[0]!r} is not one of the grid's: {sorted(variants)}")
        grid = {**grid, "variants": {tag: variants[tag] for tag in args.variant}}
    args.out.mkdir(parents=True, exist_ok=True)
    study_path = args.out / "study.json"
    done = json.loads(study_path.read_text()) if study_path.exists() else {"cells": []}
    finished = {cell["cell"] for cell in done["cells"]}
    if args.collect:
        for folder in args.collect:
            for cell in json.loads((folder / "study.json").read_text())["cells"]:
                if cell["cell"] not in finished:
                    # Ratios by the current rule, from the audit's stored cells (nothing is rerun).
                    results = finish(load_results(folder / cell["cell"] / "audit"))
                    cell["recovery"] = results["recovery"]
                    cell.setdefault("moved_share", moved_shares(results))
                    done["cells"].append(cell)
                    finished.add(cell["cell"])
        atomic_write_json(study_path, done)
        atomic_write_text(args.out / "study.md", markdown(done["cells"]))
        print(f"collected {len(done['cells'])} cells into {study_path}")
        return
    for (finetune_lr, steps), weights in itertools.product(grid["finetune"], grid["weights"]):
        spec = cell_experiment(finetune_lr, steps, weights, grid, args.device, args.data)
        if spec["name"] in finished or (args.only and spec["name"] not in args.only):
            continue
        started = time.perf_counter()
        experiment = parse_experiment(spec, source=spec["name"])
        result = run_experiment(
            experiment, args.out / spec["name"], run=RunContext(threads=args.threads, progress=False)
        )
        cell = summarize(spec["name"], result)
        base_path = json.loads((Path(result.models["target"]["path"]) / "train.json").read_text())["base"]
        cell["diagnostics_finetune"] = {
            "target": finetune_diagnostics(base_path, result.models["target"]["path"])
        }
        cell["seconds"] = time.perf_counter() - started
        done["cells"].append(cell)
        atomic_write_json(study_path, done)
        atomic_write_text(args.out / "study.md", markdown(done["cells"]))
        print(f"{spec['name']}: done in {cell['seconds']:.0f} s")
    print(f"wrote {study_path} and {args.out / 'study.md'}")


if __name__ == "__main__":
    main()
