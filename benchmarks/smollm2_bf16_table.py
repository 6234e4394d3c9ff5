"""One table from runs of the SmolLM2 bfloat16 cell (``study_smollm2.py``, cpu-bf16-robust or -bar grid).

The cell's variants can run as separate processes (``--variant``, each with its own ``--out``) that
share the cached target; this reads their ``study.json`` files and writes one Markdown table: per model,
float forget / retain recall, steps and seconds per step, the share of the forget-answer NLL gap kept
under each 4-bit attack and the noise control (the quantized model's forget recall in brackets; the
target's row gives the quantized target's), the recall gap each relearning attack brings back (read
from the audit, with the retrained model's move in brackets when the cell has one; relearning on half
of the forget set is read on the other half), the weight diagnostics on per-channel RTN and, when the
cell has a retrained model, whether the row meets the bar of docs/robustness.md:

> retain recall >= 0.9 x the target's, forget recall <= the retrained model's + 0.1, >= 90% of the gap
> kept under every 4-bit attack (where the quantized target still knows the forget set), and relearning
> recovery no worse than NPO+GDR's (the baseline row, ``npo+gdr-lr0.0001``).

    python benchmarks/smollm2_bf16_table.py OUT.md RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_smollm2 import NOISE_CONTROL, QUANTIZERS, cell_gap_kept

from relapse.audit.recovery import NO_ATTACK, finish
from relapse.audit.results import load_results

RELEARN = ("relearn-retain-25", "relearn-forget-half-25")
BASELINE = "npo+gdr-lr0.0001"
#: The bar's thresholds (docs/robustness.md).
RETAIN_SHARE, FORGET_MARGIN, KEPT = 0.9, 0.1, 0.9


def relearn_cell(cell: dict, recovery: dict, label: str, attack: str) -> str:
    """The recovered share of the recall gap under ``attack`` (the retrained model's move in brackets);
    the recall a target or retrained model reaches, in brackets."""
    values = cell["values"][label]
    reached = (values.get(attack) or {}).get("recall_forget")
    if label not in recovery:
        return "" if reached is None else f"({reached:.2f})"
    row = recovery[label].get(attack) or {}
    share, control = row.get("recall_forget"), row.get("recall_forget:control")
    if share is None:
        return "n/a" if reached is None else f"n/a ({reached:.2f})"
    return f"{share:.0%}" + ("" if control is None else f" ({control:.0%})")


def bar(cell: dict, recovery: dict, label: str) -> str:
    """Whether an unlearned row meets the bar, or which clauses it misses."""
    values, target = cell["values"], cell["target"]
    retrained = next((m for m in values if m == "retrained"), None)
    if retrained is None or label not in recovery:
        return ""
    forget, retain = values[label][NO_ATTACK]["recall_forget"], values[label][NO_ATTACK]["recall_retain"]
    floor = values[retrained][NO_ATTACK]["recall_forget"] + FORGET_MARGIN
    missed = []
    if retain < RETAIN_SHARE * values[target][NO_ATTACK]["recall_retain"]:
        missed.append("utility")
    if forget > floor + 1e-9:
        missed.append("forget")
    tested = [a for a in QUANTIZERS if (values[target].get(a) or {}).get("recall_forget", 0.0) > floor]
    kept = [cell_gap_kept(cell, label, a) for a in tested]
    if any(k is None or k < KEPT for k in kept):
        missed.append("quantization")
    if BASELINE in recovery and label != BASELINE:
        for attack in RELEARN:
            mine = (recovery[label].get(attack) or {}).get("recall_forget")
            base = (recovery[BASELINE].get(attack) or {}).get("recall_forget")
            if mine is not None and base is not None and mine > base + 1e-9:
                missed.append("relearning")
                break
    return "yes" if not missed else "no: " + ", ".join(missed)


def model_row(cell: dict, recovery: dict, label: str) -> list[str]:
    """One row of the table (see the module docstring)."""
    values, is_target = cell["values"][label], label == cell["target"]
    unlearned = label in recovery
    forget, retain = values[NO_ATTACK]["recall_forget"], values[NO_ATTACK]["recall_retain"]
    run = cell["training"].get(label, {})
    steps, seconds = run.get("steps"), run.get("seconds")
    row = [
        "target" if is_target else label,
        f"{forget:.2f} / {retain:.2f}",
        str(steps) if unlearned else "",
        f"{seconds / steps:.1f}" if unlearned and steps else "",
    ]
    for attack in [*QUANTIZERS, NOISE_CONTROL]:
        recall = (values.get(attack) or {}).get("recall_forget")
        bracket = "" if recall is None else f"({recall:.2f})"
        if not unlearned:
            row.append(bracket)
        else:
            kept = cell_gap_kept(cell, label, attack)
            row.append(("n/a" if kept is None else f"{kept:.2f}") + (f" {bracket}" if bracket else ""))
    row += [relearn_cell(cell, recovery, label, attack) for attack in RELEARN if attack in cell["attacks"]]
    moved = cell.get("moved_share", {}).get(label)
    channel = cell.get("diagnostics_unlearning", {}).get(label, {}).get("rtn-w4-ch")
    row.append(
        ""
        if channel is None
        else f"{channel['mean_dw_over_step']:.4f} / {channel['codes_changed']:.1%}"
        + ("" if moved is None else f" / {moved:.0%}")
    )
    if "retrained" in cell["values"]:
        row.append(bar(cell, recovery, label) if unlearned else "")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the Markdown file to write")
    parser.add_argument("runs", type=Path, nargs="+", help="--out folders of study_smollm2.py runs")
    args = parser.parse_args()
    rows: list[list[str]] = []
    header: list[str] = []
    for folder in args.runs:
        for cell in json.loads((folder / "study.json").read_text())["cells"]:
            # The recovered shares by the current rules, from the audit's stored cells (nothing rerun).
            results = finish(load_results(folder / cell["cell"] / "audit"))
            cell["attacks"] = results["config"]["attacks"]
            recovery = results["recovery"]
            for label in cell["values"]:
                if label == cell["target"] and rows:
                    continue  # the runs share one cached target: its row once
                rows.append(model_row(cell, recovery, label))
            relearn = [a for a in RELEARN if a in cell["attacks"]]
            header = ["model", "float forget / retain", "steps", "s/step", *QUANTIZERS, "noise", *relearn]
            header.append("rtn-w4-ch abs(dW)/step / codes changed / weights moved")
            if "retrained" in cell["values"]:
                header.append("bar")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
