"""``relapse report DIR``: turn an audit's ``results.json`` into report.md, report.html and PNG plots.

Recovery ratios and verdicts are recomputed from the cells (:func:`relapse.audit.sweep.finish`) rather
than trusted from the file, so a report always matches the current definitions even for an older or
interrupted audit; ``results.json`` itself is never written back. Every output is written atomically, so
a reader (a browser refreshing, a CI job collecting artifacts) never sees a torn file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relapse.audit.recovery import finish
from relapse.audit.results import load_results
from relapse.report.html import render_html
from relapse.report.markdown import render_markdown
from relapse.report.plots import Plot, all_plots
from relapse.report.reference import REFERENCE_NAME, Reference, load_reference
from relapse.runtime import atomic_write_bytes, atomic_write_json, atomic_write_text

MARKDOWN_NAME = "report.md"
HTML_NAME = "report.html"


def build_report(
    directory: Path, reference: str | Path | None = None, results: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write report.md, report.html and the plots into ``directory``; returns ``{file name: path}``.

    A plot whose metrics were not measured is not written (the report says why), and a stale file of
    that name from an earlier build is removed so the folder never shows a plot of other results.
    ``reference``: a file of published values to show beside the measured ones
    (:mod:`relapse.report.reference`); it is kept in ``directory`` as ``reference.json`` and shown by
    every later build too. ``results``: the directory's results already passed through
    :func:`relapse.audit.recovery.finish` (a caller that prints them too finishes them once).
    """
    directory = Path(directory)
    if results is None:
        results = finish(load_results(directory))
    table = _reference(directory, reference)
    plots: list[Plot] = all_plots(results)
    written: dict[str, Path] = {}
    for plot in plots:
        path = directory / plot.name
        if plot.png is None:
            path.unlink(missing_ok=True)
            continue
        atomic_write_bytes(path, plot.png)
        written[plot.name] = path
    atomic_write_text(directory / MARKDOWN_NAME, render_markdown(results, plots, table))
    written[MARKDOWN_NAME] = directory / MARKDOWN_NAME
    title = f"relapse audit report: {directory.resolve().name}"
    atomic_write_text(directory / HTML_NAME, render_html(results, plots, title=title, reference=table))
    written[HTML_NAME] = directory / HTML_NAME
    return written


def _reference(directory: Path, path: str | Path | None) -> Reference | None:
    """The reference to show: a new file (validated, then kept as ``reference.json``), else the one kept
    by an earlier build, else None."""
    kept = directory / REFERENCE_NAME
    if path is not None:
        reference = load_reference(path)
        atomic_write_json(kept, reference.to_json())
        return reference
    return load_reference(kept) if kept.is_file() else None
