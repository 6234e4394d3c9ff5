"""The report's content as plain tables and sentences, and its Markdown rendering.

The content functions (verdicts, metric tables, the recovery table, the weight diagnostics, the
provenance) are pure functions of a finished results dict (``relapse.audit.sweep.finish`` applied) that
return formatted strings; :mod:`relapse.report.html` renders the very same content, so the two files
cannot disagree. Numbers are formatted here once, for people: shares as percentages, metric values to
four significant digits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from relapse.audit.recovery import NO_ATTACK, interval_text, primary_metric, whole_percent
from relapse.report.plots import (
    FLOAT_BITS,
    Plot,
    attack_bits,
    goal,
    measured_metrics,
    models_with_role,
    value,
)
from relapse.report.reference import Reference, measured_label

QUESTION = "Did my model really forget, or will it relapse?"

#: A recovered share at or below this (a twentieth of a percent) reads as "nothing came back".
NOTHING_BACK = 0.0005

#: The weight diagnostics' columns: key, header, and the one line that says what it means.
DIAGNOSTIC_COLUMNS = (
    ("mean_abs_dw", "mean abs(dW)", "mean absolute change of the weights, unlearned minus target"),
    (
        "mean_dw_over_step",
        "abs(dW)/step",
        "mean change in units of the quantizer's step; well below 0.5 means most weights stay in their "
        "rounding cell",
    ),
    ("share_below_half_step", "share < step/2", "share of weights that moved less than half a step"),
    (
        "codes_changed",
        "codes changed",
        "share of integer codes that differ between the quantized target and the quantized unlearned model",
    ),
    (
        "projection",
        "projection",
        "how much of the update survives rounding: 1 = rounding keeps the update, 0 = erases it (the "
        "quantized unlearned model is the quantized target)",
    ),
)

_ANSWERS = {
    "over-unlearned": "Not usable, it lost its utility",
    "relapses": "No, it will relapse",
    "holds": "Yes, as far as these attacks reach",
    "inconclusive": "Cannot tell yet, too few items",
    "not-forgotten": "No, it did not forget in the first place",
    "unknown": "Cannot tell",
}

_ROLE_ORDER = {"target": 0, "retrained": 1, "unlearned": 2}


@dataclass(frozen=True)
class Table:
    """A titled table of formatted cells, with notes printed under it; ``styles`` (optional, shaped like
    ``rows``) names a style per cell that HTML colours by (Markdown has none)."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    styles: list[list[str]] | None = None


@dataclass(frozen=True)
class Verdict:
    """One unlearned model's answer: the plain yes/no, the status, and the audit's sentence."""

    model: str
    status: str
    answer: str
    text: str


# formatting ------------------------------------------------------------------------------------------
def fmt_value(number: float | None) -> str:
    """A metric value for a table: four significant digits, thousands without an exponent."""
    if number is None:
        return "–"
    if math.isnan(number):
        return "nan"
    if abs(number) >= 1e4:
        return f"{number:,.0f}"
    return f"{number:.4g}"


def fmt_share(share: float | None) -> str:
    """A recovered share as a percentage with one decimal (62.5%), ``n/a`` without a ratio."""
    return "n/a" if share is None else f"{share * 100:.1f}%"


# content ---------------------------------------------------------------------------------------------
def ordered_models(results: dict[str, Any]) -> list[str]:
    """Model labels: target, retrained, then the unlearned ones, each in the audit's order."""
    models = results.get("models", {})
    return sorted(models, key=lambda label: _ROLE_ORDER.get(models[label].get("role"), 3))


def attack_columns(results: dict[str, Any]) -> list[str]:
    return [NO_ATTACK, *results.get("config", {}).get("attacks", [])]


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    """The audit's verdict per unlearned model, with the plain answer to :data:`QUESTION` in front."""
    found = results.get("verdicts", {})
    out = []
    for model in models_with_role(results, "unlearned"):
        entry = found.get(model) or {"status": "unknown", "text": "no verdict was computed"}
        status = str(entry.get("status", "unknown"))
        out.append(Verdict(model, status, _ANSWERS.get(status, status), str(entry.get("text", ""))))
    return out


def quantization_lines(results: dict[str, Any]) -> list[str]:
    """One plain sentence per unlearned model and quantization attack: what rounding brought back of the
    primary metric's gap, with its interval, the retrained control and the gap kept between the quantized
    target and the quantized unlearned model.

    Zero is said as zero ("brought nothing back"); a model that relapses is not softened either.
    """
    recovery = results.get("recovery", {})
    metric = primary_metric(results)
    lines = []
    for model in models_with_role(results, "unlearned"):
        for attack in results.get("config", {}).get("attacks", []):
            bits = attack_bits(attack)
            if bits is None or bits >= FLOAT_BITS or metric is None:
                continue
            cell = recovery.get(model, {}).get(attack, {})
            share = cell.get(metric)
            what = f"{model}: {bits}-bit rounding ({attack})"
            if share is None:
                lines.append(f"{what}: no recovery could be computed (no forgetting gap or no measurement).")
                continue
            interval = interval_text(cell.get(f"{metric}:interval"))
            if share <= NOTHING_BACK:
                sentence = f"{what} brought nothing back of the {metric} gap ({fmt_share(share)}{interval})"
            else:
                sentence = f"{what} brought back {fmt_share(share)}{interval} of the {metric} gap"
            notes = []
            if cell.get(f"{metric}:control") is not None:
                notes.append(f"retrained control {fmt_share(cell[f'{metric}:control'])}")
            if cell.get(f"{metric}:kept") is not None:
                kept = fmt_share(cell[f"{metric}:kept"]) + interval_text(cell.get(f"{metric}:kept_interval"))
                notes.append(f"gap kept {kept}")
            lines.append(sentence + (f" ({'; '.join(notes)})" if notes else "") + ".")
    return lines


def missing_cells(results: dict[str, Any]) -> list[str]:
    """``model|attack`` keys the audit should have and does not (an unfinished or interrupted audit)."""
    cells = results.get("cells", {})
    return [
        f"{model}|{attack}"
        for model in ordered_models(results)
        for attack in attack_columns(results)
        if f"{model}|{attack}" not in cells
    ]


def metric_tables(results: dict[str, Any]) -> list[Table]:
    """One table per measured metric: models (with role) x (none + each attack)."""
    models, attacks = ordered_models(results), attack_columns(results)
    tables = []
    for metric in measured_metrics(results):
        rows = [
            [
                model,
                results["models"][model].get("role", ""),
                *(fmt_value(value(results, model, a, metric)) for a in attacks),
            ]
            for model in models
        ]
        tables.append(Table(f"{metric} (goal: {goal(metric)})", ["model", "role", *attacks], rows))
    return tables


#: What the matrix says of one attack on one model (the verdict's per-attack decisions).
_DECISION_WORDS = {
    "relapses": "relapses",
    "holds": "holds",
    "inconclusive": "cannot tell",
    "no-test": "no test",
    "no-ratio": "n/a",
}


def glance_view(results: dict[str, Any]) -> Table | None:
    """Unlearned models x attacks at a glance: each cell the verdict's decision for that attack on the
    primary metric, with the recovered share and its 95% interval; None when no verdict has decisions."""
    attacks = list(results.get("config", {}).get("attacks", []))
    recovery, found = results.get("recovery", {}), results.get("verdicts", {})
    rows, styles, metric = [], [], None
    for model in models_with_role(results, "unlearned"):
        entry = found.get(model) or {}
        decisions, followed = entry.get("attacks") or {}, entry.get("metric")
        metric = metric or followed
        row, style = [model], [str(entry.get("status", ""))]
        for attack in attacks:
            decision = decisions.get(attack)
            cell = recovery.get(model, {}).get(attack, {})
            share = cell.get(followed) if followed else None
            text = _DECISION_WORDS.get(decision, "–") if decision else "–"
            if share is not None and decision in ("relapses", "holds", "inconclusive"):
                text += f" {whole_percent(share)}{interval_text(cell.get(f'{followed}:interval'))}"
            row.append(text)
            style.append(decision or "")
        rows.append(row)
        styles.append(style)
    if metric is None:
        return None
    notes = [
        f"Each cell: the decision for that attack on {metric} (the audit's primary metric), the share of "
        "its forgetting gap the attack brought back and, where items allow, its 95% bootstrap interval.",
        "relapses: the share net of the retrained control reaches the threshold and its interval clears "
        "both controls; holds: the net share's upper bound stays under the threshold; cannot tell: the "
        "items are too few to decide; no test: the quantized target itself fell to the retrained level; "
        "n/a: no gap to recover.",
    ]
    return Table(f"At a glance ({metric})", ["model", *attacks], rows, notes, styles)


def seeds_view(results: dict[str, Any]) -> Table | None:
    """Methods run with several seeds: per attack, the recovered share's mean and standard deviation over
    the seeds, and how many seeds got each verdict; None when no method was repeated."""
    summary = results.get("seed_summary") or {}
    if not summary:
        return None
    attacks = list(results.get("config", {}).get("attacks", []))
    rows = []
    for group, entry in summary.items():
        verdict_counts = ", ".join(f"{status} {count}" for status, count in sorted(entry["statuses"].items()))
        cells = []
        for attack in attacks:
            stats = entry["attacks"].get(attack) or {}
            if stats.get("mean") is None:
                cells.append("n/a")
                continue
            spread = "" if stats.get("sd") is None else f" ± {stats['sd'] * 100:.1f}"
            cells.append(f"{stats['mean'] * 100:.1f}{spread}% (n={stats['n']})")
        rows.append([group, str(len(entry["models"])), verdict_counts, *cells])
    metric = next(iter(summary.values()))["metric"]
    notes = [
        f"Each method unlearned once per seed and audited per seed; per attack the recovered share of the "
        f"{metric} gap, mean ± sample standard deviation over the seeds (n: seeds with a ratio), and the "
        "verdicts the seeds got. The spread over seeds is uncertainty that the item intervals do not show.",
    ]
    return Table(f"Across seeds ({metric})", ["method", "seeds", "verdicts", *attacks], rows, notes)


def recovery_view(results: dict[str, Any]) -> Table:
    """Unlearned models x attacks: the recovered share of the primary metric's gap, its interval, and the
    retrained control (every other forget metric's share is in results.json under ``recovery``)."""
    attacks = list(results.get("config", {}).get("attacks", []))
    recovery = results.get("recovery", {})
    rows = []
    metric = primary_metric(results)
    for model in models_with_role(results, "unlearned"):
        row = [model]
        for attack in attacks:
            cell = recovery.get(model, {}).get(attack, {})
            share = cell.get(metric) if metric else None
            if share is None:
                row.append("n/a")
                continue
            text = fmt_share(share) + interval_text(cell.get(f"{metric}:interval"))
            control = cell.get(f"{metric}:control")
            if control is not None:
                text += f" (control {fmt_share(control)})"
            row.append(text)
        rows.append(row)
    notes = [
        "Recovered share = (M(attacked unlearned) - M(unlearned)) / (M(target) - M(unlearned)) on "
        f"{metric or 'the primary metric'}: 0 means the attack brought nothing back, 100% that the attacked "
        "model scores like the target; in brackets its 95% paired bootstrap interval over items.",
        "The control is the retrained model's move under the same attack over the same gap (an attack that "
        "teaches moves it too, one that uncovers forgotten knowledge does not). n/a: no gap to recover or "
        "not measured.",
    ]
    return Table(f"Recovery under each attack ({metric})", ["model", *attacks], rows, notes)


def reference_view(results: dict[str, Any], reference: Reference) -> Table:
    """Each reference row's values beside the measured ones of the unattacked model of that label or role
    (``measured / reference`` per metric)."""
    metrics = list(dict.fromkeys(metric for values in reference.rows.values() for metric in values))
    rows = []
    for label, values in reference.rows.items():
        model = measured_label(results, label)
        cells = [label if model is None or model == label else f"{label} ({model})"]
        for metric in metrics:
            measured = None if model is None else value(results, model, NO_ATTACK, metric)
            cells.append(f"{fmt_value(measured)} / {fmt_value(values.get(metric))}")
        rows.append(cells)
    return Table(
        title="Measured beside the reference",
        header=["model", *(f"{metric} (measured / reference)" for metric in metrics)],
        rows=rows,
        notes=[
            f"reference: {reference.source}",
            "measured: the unattacked model of the row's label (or the audit's only model of that role); "
            "– where it was not measured or the audit has no such model",
        ],
    )


def diagnostics_view(results: dict[str, Any]) -> Table | None:
    """Per unlearned model and grid attack, the weight diagnostics; ``None`` when none were computed."""
    diagnostics = results.get("diagnostics") or {}
    rows = []
    for model in models_with_role(results, "unlearned"):
        for attack, entry in (diagnostics.get(model) or {}).items():
            rows.append(
                [model, attack, *(_fmt_diagnostic(key, entry.get(key)) for key, _, _ in DIAGNOSTIC_COLUMNS)]
            )
    if not rows:
        return None
    notes = [f"{header}: {meaning}." for _, header, meaning in DIAGNOSTIC_COLUMNS]
    header = ["model", "attack", *(h for _, h, _ in DIAGNOSTIC_COLUMNS)]
    return Table("Weight diagnostics (unlearned vs target, on each attack's grid)", header, rows, notes)


def _fmt_diagnostic(key: str, number: Any) -> str:
    if not isinstance(number, int | float) or isinstance(number, bool):
        return "–"
    if key in ("share_below_half_step", "codes_changed"):
        return f"{number * 100:.1f}%"
    if key == "projection":
        return f"{number:.3f}"
    return f"{number:.3g}"


def provenance(results: dict[str, Any]) -> dict[str, Any]:
    """What reproduces the audit: its config, hash, seed, threads and the package versions."""
    return {
        "config": results.get("config", {}),
        "config_hash": results.get("config_hash"),
        "seed": results.get("seed"),
        "threads": results.get("threads"),
        "versions": results.get("versions", {}),
    }


def plot_notes(plots: list[Plot]) -> list[str]:
    return [f"{plot.name}: {plot.note}" for plot in plots if plot.png is None]


# rendering -------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    """Table-safe Markdown: a pipe would split the cell, a newline the row."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def table_markdown(table: Table, level: int = 3) -> list[str]:
    lines = [f"{'#' * level} {_cell(table.title)}", ""]
    lines.append("| " + " | ".join(_cell(h) for h in table.header) + " |")
    lines.append("|" + "|".join("---" for _ in table.header) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    if table.notes:
        lines.append("")
        lines += [f"- {note}" for note in table.notes]
    lines.append("")
    return lines


def render_markdown(results: dict[str, Any], plots: list[Plot], reference: Reference | None = None) -> str:
    """The whole report as Markdown; plots are linked by file name (they sit next to ``report.md``)."""
    lines = ["# relapse audit report", "", f"## {QUESTION}", ""]
    found = verdicts(results)
    if not found:
        lines.append("No unlearned model in this audit: nothing to judge.")
    lines += [f"- **{_cell(v.model)}**: {v.answer}: {_cell(v.text)}. `[{v.status}]`" for v in found]
    quantization = quantization_lines(results)
    if quantization:
        lines += ["", "### Quantization, plainly", ""]
        lines += [f"- {_cell(line)}" for line in quantization]
    for warning in results.get("warnings") or []:
        lines += ["", f"> Warning: {_cell(warning)}"]
    missing = missing_cells(results)
    if missing:
        lines += ["", f"> {len(missing)} cells are missing (an unfinished audit?): {', '.join(missing)}"]
    lines += ["", "## Plots", ""]
    for plot in plots:
        lines.append(f"![{plot.alt}]({plot.name})" if plot.png is not None else f"- {plot.name} {plot.note}")
        lines.append("")
    lines += ["## Metrics", ""]
    for table in metric_tables(results):
        lines += table_markdown(table)
    if reference is not None:
        lines += table_markdown(reference_view(results, reference))
    lines += ["## Recovery", ""]
    for extra in (glance_view(results), seeds_view(results)):
        lines += table_markdown(extra) if extra is not None else []
    lines += table_markdown(recovery_view(results))
    lines += ["## Weight diagnostics", ""]
    diagnostics = diagnostics_view(results)
    if diagnostics is None:
        lines += ["None computed (no grid-based attack, or the audit did not finish).", ""]
    else:
        lines += table_markdown(diagnostics)
    info = provenance(results)
    lines += ["## Config, seed and versions", "", f"- seed: {info['seed']}"]
    lines += [f"- config hash: {info['config_hash']}", f"- threads: {info['threads']}", ""]
    lines += ["| package | version |", "|---|---|"]
    lines += [f"| {_cell(str(k))} | {_cell(str(v))} |" for k, v in info["versions"].items()]
    lines += ["", "```json", json.dumps(info["config"], indent=2, default=str), "```", ""]
    return "\n".join(lines)
