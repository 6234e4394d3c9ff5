"""One table from several runs of the SmolLM2 bfloat16 cell (``study_smollm2.py --grid cpu-bf16-robust``).

The cell's variants can run as separate processes (``--variant``, each with its own ``--out``) that
share the cached target; this reads their ``study.json`` files and writes one Markdown table: per model,
float forget / retain recall, steps and seconds per step, the share of the forget-answer NLL gap kept
under each 4-bit attack and the noise control (the quantized model's forget recall in brackets; the
target's row gives the quantized target's), the recall gap relearning on retain data brings back, and
the weight diagnostics on per-channel RTN.

    python benchmarks/smollm2_bf16_table.py OUT.md RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_smollm2 import NOISE_CONTROL, QUANTIZERS, cell_gap_kept

from relapse.audit.recovery import NO_ATTACK

RELEARN = "relearn-retain-25"


def model_row(cell: dict, label: str) -> list[str]:
    """One row of the table (see the module docstring)."""
    values, is_target = cell["values"][label], label == cell["target"]
    forget, retain = values[NO_ATTACK]["recall_forget"], values[NO_ATTACK]["recall_retain"]
    run = cell["training"].get(label, {})
    steps, seconds = run.get("steps"), run.get("seconds")
    row = [
        "target" if is_target else label,
        f"{forget:.2f} / {retain:.2f}",
        "" if is_target else str(steps),
        "" if is_target or not steps else f"{seconds / steps:.1f}",
    ]
    for attack in [*QUANTIZERS, NOISE_CONTROL]:
        recall = (values.get(attack) or {}).get("recall_forget")
        bracket = "" if recall is None else f"({recall:.2f})"
        if is_target:
            row.append(bracket)
        else:
            kept = cell_gap_kept(cell, label, attack)
            row.append(("n/a" if kept is None else f"{kept:.2f}") + (f" {bracket}" if bracket else ""))
    relearned = (values.get(RELEARN) or {}).get("recall_forget")
    if is_target or relearned is None:
        row.append("" if relearned is None else f"({relearned:.2f})")
    else:
        target_forget = cell["values"][cell["target"]][NO_ATTACK]["recall_forget"]
        gap = target_forget - forget
        share = "n/a" if gap <= 0.02 else f"{(relearned - forget) / gap:.0%}"
        row.append(f"{share} ({relearned:.2f})")
    moved = cell.get("moved_share", {}).get(label)
    channel = cell.get("diagnostics_unlearning", {}).get(label, {}).get("rtn-w4-ch")
    row.append(
        ""
        if channel is None
        else f"{channel['mean_dw_over_step']:.4f} / {channel['codes_changed']:.1%}"
        + ("" if moved is None else f" / {moved:.0%}")
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the Markdown file to write")
    parser.add_argument("runs", type=Path, nargs="+", help="--out folders of study_smollm2.py runs")
    args = parser.parse_args()
    rows: list[list[str]] = []
    for folder in args.runs:
        for cell in json.loads((folder / "study.json").read_text())["cells"]:
            for label in cell["values"]:
                if label == cell["target"] and rows:
                    continue  # the runs share one cached target: its row once
                rows.append(model_row(cell, label))
    header = ["model", "float forget / retain", "steps", "s/step", *QUANTIZERS, "noise", RELEARN]
    header.append("rtn-w4-ch abs(dW)/step / codes changed / weights moved")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
