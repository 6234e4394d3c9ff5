"""The report's three plots, drawn from an audit's results as PNG bytes.

Each ``plot_*`` function is pure: it reads the results dict and returns a :class:`Plot` whose ``png`` is
the image, or ``None`` with a ``note`` saying why the plot was skipped (its metrics were not measured).
Writing files is :mod:`relapse.report.build`'s job, so the plots can be tested and embedded without
touching disk. matplotlib is imported inside the drawing code only: reading this module, or a report
without plots, should not pay for it. Figures are built with the object API on an Agg canvas (never
``pyplot``), so no global backend or figure state is touched.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from relapse.audit.recovery import NO_ATTACK, UTILITY_METRICS, cell_key
from relapse.metrics.catalog import metric_info, plot_forget_metrics

#: Where the unattacked (floating-point) model sits on the bit-width axis.
FLOAT_BITS = 16

#: The forget metric the plots follow: the first of these that was measured (``plot_rank`` in
#: :mod:`relapse.metrics.catalog`).
PLOT_FORGET_METRICS = plot_forget_metrics()

#: The utility metric of the trade-off plot: the first of these that was measured (the utility gate's).
PLOT_UTILITY_METRICS = UTILITY_METRICS

DPI = 110


@dataclass(frozen=True)
class Plot:
    """One plot of the report: its file name, a caption, alt text, and the image or why there is none."""

    name: str
    title: str
    alt: str
    png: bytes | None = None
    note: str = ""


def attack_bits(name: str) -> int | None:
    """The weight bit width an attack quantizes to (its declared ``bits``), ``FLOAT_BITS`` for ``none``,
    else ``None``.

    Only attacks that round weights to a low-bit format have a bit width: noise shaped like a quantizer's
    error (``noise-like-rtn-w4-g128``), pruning and relearning do not, so they stay off the bits axis; so
    does a name this version does not know.
    """
    if name.strip().lower() == NO_ATTACK:
        return FLOAT_BITS
    attack = _attack(name)
    return attack.bits if attack else None


def _attack(name: str):
    """The registered attack of that name, or None (imported here: reading the report needs no torch)."""
    from relapse.attacks.registry import attack_or_none

    return attack_or_none(name)


def _plain_rounding(name: str) -> bool:
    """Whether ``name`` is the model as it is or plain RTN rounding (what GPTQ, AWQ and the others
    refine), the attack the bits plot prefers where several share a bit width."""
    from relapse.attacks.weights import RTNAttack

    return name == NO_ATTACK or isinstance(_attack(name), RTNAttack)


def measured_metrics(results: dict[str, Any]) -> list[str]:
    """Metric names with at least one value in the cells, configured ones first in their order."""
    seen: list[str] = []
    for cell in results.get("cells", {}).values():
        for name in cell.get("metrics", {}):
            if name not in seen:
                seen.append(name)
    configured = [m for m in results.get("config", {}).get("metrics", []) if m in seen]
    return configured + [m for m in seen if m not in configured]


def first_measured(results: dict[str, Any], candidates: tuple[str, ...]) -> str | None:
    """The first of ``candidates`` that the audit measured, or ``None``."""
    measured = set(measured_metrics(results))
    return next((m for m in candidates if m in measured), None)


def value(results: dict[str, Any], model: str, attack: str, metric: str) -> float | None:
    """One cell's value, ``None`` when the cell or the metric is missing or not a finite number."""
    cell = results.get("cells", {}).get(cell_key(model, attack))
    entry = (cell or {}).get("metrics", {}).get(metric)
    number = entry.get("value") if isinstance(entry, dict) else None
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
        return None
    return float(number)


def models_with_role(results: dict[str, Any], role: str) -> list[str]:
    return [label for label, info in results.get("models", {}).items() if info.get("role") == role]


def goal(metric: str) -> str:
    """``lower``, ``higher`` or ``near X``: which way a metric should go, as its declaration says
    (:attr:`relapse.metrics.catalog.MetricInfo.goal`); ``unknown`` for a name this version does not know."""
    info = metric_info(metric)
    return (info.goal if info else None) or "unknown"


def bits_points(results: dict[str, Any], model: str, metric: str) -> list[tuple[int, str, float]]:
    """``(bits, attack, value)`` per bit width for one model, sorted by bits.

    When several attacks share a bit width the RTN one is shown (the plain rounding the others refine),
    else the first in the audit's order; an attack whose cell has no value is passed over.
    """
    attacks = [NO_ATTACK, *results.get("config", {}).get("attacks", [])]
    chosen: dict[int, tuple[int, str, float]] = {}
    for order, attack in enumerate(attacks):
        bits = attack_bits(attack)
        number = value(results, model, attack, metric)
        if bits is None or number is None:
            continue
        rank = order if _plain_rounding(attack) else order + len(attacks)
        if bits not in chosen or rank < chosen[bits][0]:
            chosen[bits] = (rank, attack, number)
    return [(bits, attack, number) for bits, (_, attack, number) in sorted(chosen.items())]


def plain(text: str) -> str:
    """A label drawn as written: matplotlib would read ``$...$`` in a folder name as mathtext."""
    return text.replace("$", r"\$")


def _png(figure) -> bytes:
    """Render a figure to PNG bytes on an Agg canvas (no pyplot, so no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_bits(results: dict[str, Any]) -> Plot:
    """The forget metric against bit width, one line per unlearned model, target and retrained as lines.

    It shows at a glance where forgetting gives way: a line that climbs to the target's level as the bits
    drop means rounding erased the unlearning update.
    """
    name, title = "plot_bits.png", "Forgetting vs bit width"
    metric = first_measured(results, PLOT_FORGET_METRICS)
    if metric is None:
        return Plot(name, title, "", note=f"skipped: none of {', '.join(PLOT_FORGET_METRICS)} was measured")
    lines = {m: bits_points(results, m, metric) for m in models_with_role(results, "unlearned")}
    lines = {m: points for m, points in lines.items() if points}
    if not any(bits < FLOAT_BITS for points in lines.values() for bits, _, _ in points):
        return Plot(name, title, "", note="skipped: no quantization attack with a bit width was measured")
    figure = _figure(6.0, 3.8)
    axes = figure.add_subplot()
    ticks: set[int] = set()
    for model, points in lines.items():
        xs = [bits for bits, _, _ in points]
        ticks.update(xs)
        axes.plot(xs, [v for _, _, v in points], marker="o", label=plain(model))
    for role, color in (("target", "black"), ("retrained", "tab:green")):
        for label in models_with_role(results, role):
            reference = value(results, label, NO_ATTACK, metric)
            if reference is not None:
                name_role = label if label == role else f"{label} ({role})"
                axes.axhline(reference, color=color, linestyle="--", linewidth=1, label=plain(name_role))
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(ticks))
    axes.set_xticklabels(["float" if b == FLOAT_BITS else str(b) for b in sorted(ticks)])
    axes.minorticks_off()
    axes.invert_xaxis()  # read left to right as ever harsher rounding
    axes.set_xlabel("weight bits (rtn preferred where several attacks share a width)")
    axes.set_ylabel(f"{metric} (goal: {goal(metric)})")
    axes.set_title(f"{metric} vs bit width", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    alt = f"Line plot of {metric} against weight bit width for {', '.join(lines)}, with the target and "
    alt += "retrained models as dashed reference lines"
    return Plot(name, title, alt, _png(figure))


def plot_recovery(results: dict[str, Any]) -> Plot:
    """Heatmap of the recovered share of the forget metric's gap, unlearned models x attacks.

    Expects ``results["recovery"]`` as :func:`relapse.audit.sweep.finish` leaves it. Cells without a
    ratio (no gap to recover, or the cell was not measured) are grey and hatched, never drawn as 0.
    """
    name, title = "plot_recovery.png", "Recovered share of the forgetting gap"
    metric = first_measured(results, PLOT_FORGET_METRICS)
    models = models_with_role(results, "unlearned")
    attacks = list(results.get("config", {}).get("attacks", []))
    if metric is None:
        return Plot(name, title, "", note=f"skipped: none of {', '.join(PLOT_FORGET_METRICS)} was measured")
    if not models or not attacks:
        return Plot(name, title, "", note="skipped: no unlearned model or no attack in this audit")
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import PercentFormatter

    recovery = results.get("recovery", {})
    grid = [[recovery.get(m, {}).get(a, {}).get(metric) for a in attacks] for m in models]
    numbers = [[math.nan if r is None else float(r) for r in row] for row in grid]
    figure = _figure(max(4.5, 1.0 * len(attacks) + 2.5), max(2.2, 0.55 * len(models) + 1.6))
    axes = figure.add_subplot()
    image = axes.imshow(numbers, cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(grid):
        for j, ratio in enumerate(row):
            if ratio is None:
                axes.add_patch(
                    Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", hatch="//", edgecolor="0.6")
                )
                axes.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="0.3")
            else:
                color = "white" if ratio > 0.6 else "black"
                axes.text(j, i, f"{ratio * 100:.1f}%", ha="center", va="center", fontsize=8, color=color)
    axes.set_xticks(range(len(attacks)), [plain(a) for a in attacks], rotation=30, ha="right", fontsize=8)
    axes.set_yticks(range(len(models)), [plain(m) for m in models], fontsize=8)
    axes.set_title(f"recovered share of the {metric} gap (0 = nothing back, 100% = target)", fontsize=9)
    bar = figure.colorbar(image, ax=axes, shrink=0.9, format=PercentFormatter(1.0))
    bar.set_label("recovered share", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    alt = f"Heatmap of the recovered share of the {metric} gap for {len(models)} unlearned models under "
    alt += f"{len(attacks)} attacks; grey hatched cells have no ratio"
    return Plot(name, title, alt, _png(figure))


def plot_tradeoff(results: dict[str, Any]) -> Plot:
    """Utility against the forget metric, one large point per model unattacked, small ones attacked.

    Unlearning should move a model left (forgotten) without moving it down (utility lost); the small
    markers show where each attack takes it, joined to its unattacked point.
    """
    name, title = "plot_tradeoff.png", "Utility vs forgetting"
    forget = first_measured(results, PLOT_FORGET_METRICS)
    utility = first_measured(results, PLOT_UTILITY_METRICS)
    if forget is None or utility is None:
        missing = PLOT_FORGET_METRICS if forget is None else PLOT_UTILITY_METRICS
        return Plot(name, title, "", note=f"skipped: none of {', '.join(missing)} was measured")
    attacks = [NO_ATTACK, *results.get("config", {}).get("attacks", [])]
    points: dict[str, list[tuple[str, float, float]]] = {}
    for model in results.get("models", {}):
        pairs = [(a, value(results, model, a, forget), value(results, model, a, utility)) for a in attacks]
        points[model] = [(a, x, y) for a, x, y in pairs if x is not None and y is not None]
    if not any(p and p[0][0] == NO_ATTACK for p in points.values()):
        return Plot(name, title, "", note=f"skipped: no model has both {forget} and {utility} unattacked")
    figure = _figure(6.0, 4.2)
    axes = figure.add_subplot()
    markers = {"target": "s", "retrained": "D", "unlearned": "o"}
    palette = ["tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    unlearned_index = 0
    for model, entries in points.items():
        role = results["models"][model].get("role", "unlearned")
        if role == "target":
            color = "black"
        elif role == "retrained":
            color = "tab:green"
        else:
            color, unlearned_index = palette[unlearned_index % len(palette)], unlearned_index + 1
        base = next(((x, y) for a, x, y in entries if a == NO_ATTACK), None)
        for attack, x, y in entries:
            if attack == NO_ATTACK:
                continue
            if base is not None:
                axes.plot([base[0], x], [base[1], y], color=color, alpha=0.25, linewidth=0.8)
            axes.scatter([x], [y], s=14, color=color, marker=markers.get(role, "o"), alpha=0.6)
        if base is not None:
            axes.scatter([base[0]], [base[1]], s=70, color=color, marker=markers.get(role, "o"), zorder=3)
            name_role = model if model == role else f"{model} ({role})"
            axes.annotate(plain(name_role), base, xytext=(5, 5), textcoords="offset points", fontsize=8)
    axes.set_xlabel(f"{forget} (goal: {goal(forget)})")
    axes.set_ylabel(f"{utility} (goal: {goal(utility)})")
    axes.set_title("utility vs forgetting (large: unattacked, small: attacked)", fontsize=9)
    axes.grid(alpha=0.3)
    alt = f"Scatter plot of {utility} against {forget} for every model, unattacked (large labelled "
    alt += "markers) and under each attack (small markers joined to them)"
    return Plot(name, title, alt, _png(figure))


def all_plots(results: dict[str, Any]) -> list[Plot]:
    """The report's plots in the order they are shown."""
    return [plot_bits(results), plot_recovery(results), plot_tradeoff(results)]
