"""``relapse report DIR``: turn an audit's ``results.json`` into report.md, report.html and PNG plots.

Recovery ratios and verdicts are recomputed from the cells (:func:`relapse.audit.sweep.finish`) rather
than trusted from the file, so a report always matches the current definitions even for an older or
interrupted audit; ``results.json`` itself is never written back. Every output is written atomically, so
a reader (a browser refreshing, a CI job collecting artifacts) never sees a torn file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from relapse.audit.recovery import finish
from relapse.errors import ConfigError
from relapse.report.html import render_html
from relapse.report.markdown import render_markdown
from relapse.report.plots import Plot, all_plots
from relapse.runtime import atomic_write_bytes, atomic_write_text

RESULTS_NAME = "results.json"  # the same name relapse.audit.sweep writes (not imported: it loads torch)
MARKDOWN_NAME = "report.md"
HTML_NAME = "report.html"


def load_results(directory: Path) -> dict[str, Any]:
    """Read and check ``directory/results.json``; a missing or malformed file is a :class:`ConfigError`.

    Only the structure the report relies on is checked, so the message can say what is wrong instead of
    a ``KeyError`` from deep inside the tables.
    """
    path = Path(directory) / RESULTS_NAME
    if not path.is_file():
        raise ConfigError(
            f"no {RESULTS_NAME} in {directory}: give the folder an audit wrote (relapse audit --out DIR)"
        )
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    problem = _schema_problem(results)
    if problem:
        raise ConfigError(f"{path} is not an audit's results: {problem}")
    return results


def _schema_problem(results: Any) -> str | None:
    """The first thing the report needs that ``results`` lacks, or ``None``."""
    if not isinstance(results, dict):
        return "the top level is not a JSON object"
    if results.get("kind", "relapse-audit") != "relapse-audit":
        return f"its kind is {results.get('kind')!r}, not 'relapse-audit'"
    for key in ("config", "models", "cells"):
        if not isinstance(results.get(key), dict):
            return f"'{key}' is missing or not an object"
    config = results["config"]
    if not isinstance(config.get("attacks"), list) or not all(isinstance(a, str) for a in config["attacks"]):
        return "'config.attacks' is missing or not a list of names"
    if not isinstance(config.get("metrics", []), list):
        return "'config.metrics' is not a list of names"
    for label, info in results["models"].items():
        if not isinstance(info, dict) or info.get("role") not in ("target", "retrained", "unlearned"):
            return f"model {label!r} has no role of target, retrained or unlearned"
    for key, cell in results["cells"].items():
        if not isinstance(cell, dict) or not isinstance(cell.get("metrics"), dict):
            return f"cell {key!r} has no 'metrics' object"
        for name, entry in cell["metrics"].items():
            number = entry.get("value", "") if isinstance(entry, dict) else ""
            if number is not None and (isinstance(number, bool) or not isinstance(number, int | float)):
                return f"metric {name!r} of cell {key!r} has no numeric 'value'"
    for key in ("diagnostics", "versions"):
        if results.get(key) is not None and not isinstance(results[key], dict):
            return f"'{key}' is not an object"
    return None


def build_report(directory: Path) -> dict[str, Path]:
    """Write report.md, report.html and the plots into ``directory``; returns ``{file name: path}``.

    A plot whose metrics were not measured is not written (the report says why), and a stale file of
    that name from an earlier build is removed so the folder never shows a plot of other results.
    """
    directory = Path(directory)
    results = finish(load_results(directory))
    plots: list[Plot] = all_plots(results)
    written: dict[str, Path] = {}
    for plot in plots:
        path = directory / plot.name
        if plot.png is None:
            path.unlink(missing_ok=True)
            continue
        atomic_write_bytes(path, plot.png)
        written[plot.name] = path
    atomic_write_text(directory / MARKDOWN_NAME, render_markdown(results, plots))
    written[MARKDOWN_NAME] = directory / MARKDOWN_NAME
    title = f"relapse audit report: {directory.resolve().name}"
    atomic_write_text(directory / HTML_NAME, render_html(results, plots, title=title))
    written[HTML_NAME] = directory / HTML_NAME
    return written
