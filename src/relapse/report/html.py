"""The report as one self-contained HTML file: verdicts first, plots inline, the same tables as Markdown.

Self-contained means no external CSS, JavaScript or image: the file can be mailed, archived or opened
offline and still shows everything, so plots are embedded as ``data:`` URIs. Every string that comes from
the results (labels, attack names, config values) is escaped with :func:`html.escape`, since a results
folder is data and must never be able to inject markup into the page.
"""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

from relapse.report.markdown import (
    QUESTION,
    Table,
    diagnostics_view,
    glance_view,
    metric_tables,
    missing_cells,
    provenance,
    quantization_lines,
    recovery_view,
    reference_view,
    seeds_view,
    verdicts,
)
from relapse.report.plots import Plot
from relapse.report.reference import Reference

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:72rem;
padding:0 1rem;color:#1a1a1a;line-height:1.45}
h1{font-size:1.5rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}h3{font-size:1rem}
.verdict{border-left:6px solid #888;background:#f6f6f6;padding:.6rem 1rem;margin:.6rem 0;font-size:1.05rem}
.verdict.relapses,.verdict.not-forgotten{border-color:#c0392b;background:#fdecea}
.verdict.over-unlearned{border-color:#8e44ad;background:#f5eef8}
.verdict.holds{border-color:#27ae60;background:#eafaf1}
.status{font-family:monospace;font-size:.85rem;color:#555}
table{border-collapse:collapse;margin:.5rem 0;font-size:.85rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f0f0f0}
.notes{font-size:.8rem;color:#444}figure{margin:1rem 0}img{max-width:100%}
.missing{color:#a04000}pre{background:#f6f6f6;padding:.6rem;overflow-x:auto;font-size:.8rem}
td.relapses{background:#f5b7b1}td.holds{background:#abebc6}td.inconclusive{background:#fcf3cf}
td.no-test,td.no-ratio{background:#eaeded;color:#555}td.over-unlearned{color:#8e44ad;font-weight:600}
.verdict.inconclusive{border-color:#d4ac0d;background:#fef9e7}
"""


def table_html(table: Table) -> str:
    """One table with its title and notes, every cell escaped."""
    parts = [f"<h3>{escape(table.title)}</h3>", "<table>", "<thead><tr>"]
    parts += [f"<th>{escape(h)}</th>" for h in table.header]
    parts.append("</tr></thead><tbody>")
    styles = table.styles or [[""] * len(row) for row in table.rows]
    for row, style in zip(table.rows, styles, strict=True):
        cells = (f'<td class="{escape(k)}">' if k else "<td>" for k in style)
        parts.append(
            "<tr>" + "".join(f"{td}{escape(c)}</td>" for td, c in zip(cells, row, strict=True)) + "</tr>"
        )
    parts.append("</tbody></table>")
    if table.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in table.notes) + "</ul>")
    return "\n".join(parts)


def plot_html(plot: Plot) -> str:
    """The plot inline as a base64 PNG with alt text, or the note saying why it was skipped."""
    if plot.png is None:
        return f'<p class="notes">{escape(plot.name)} {escape(plot.note)}</p>'
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(plot.alt)}">'
        f"<figcaption>{escape(plot.title)}</figcaption></figure>"
    )


def render_html(
    results: dict[str, Any],
    plots: list[Plot],
    title: str = "relapse audit report",
    reference: Reference | None = None,
) -> str:
    """The whole report as one HTML page (see the module docstring for why it embeds everything)."""
    body = [f"<h1>{escape(title)}</h1>", f"<h2>{escape(QUESTION)}</h2>"]
    found = verdicts(results)
    if not found:
        body.append("<p>No unlearned model in this audit: nothing to judge.</p>")
    for v in found:
        body.append(
            f'<div class="verdict {escape(v.status)}"><strong>{escape(v.model)}</strong>: '
            f'{escape(v.answer)}: {escape(v.text)}. <span class="status">[{escape(v.status)}]</span></div>'
        )
    quantization = quantization_lines(results)
    if quantization:
        body.append("<h3>Quantization, plainly</h3><ul>")
        body += [f"<li>{escape(line)}</li>" for line in quantization]
        body.append("</ul>")
    for warning in results.get("warnings") or []:
        body.append(f'<p class="missing">Warning: {escape(warning)}</p>')
    missing = missing_cells(results)
    if missing:
        body.append(
            f'<p class="missing">{len(missing)} cells are missing (an unfinished audit?): '
            f"{escape(', '.join(missing))}</p>"
        )
    body.append("<h2>Plots</h2>")
    body += [plot_html(plot) for plot in plots]
    body.append("<h2>Metrics</h2>")
    body += [table_html(table) for table in metric_tables(results)]
    if reference is not None:
        body.append(table_html(reference_view(results, reference)))
    extras = [table for table in (glance_view(results), seeds_view(results)) if table is not None]
    body += ["<h2>Recovery</h2>", *(table_html(table) for table in extras)]
    body += [table_html(recovery_view(results)), "<h2>Weight diagnostics</h2>"]
    diagnostics = diagnostics_view(results)
    body.append(
        "<p>None computed (no grid-based attack, or the audit did not finish).</p>"
        if diagnostics is None
        else table_html(diagnostics)
    )
    info = provenance(results)
    versions = "".join(
        f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>" for k, v in info["versions"].items()
    )
    body += [
        "<details><summary>Config, seed and package versions</summary>",
        f"<p>seed: {escape(str(info['seed']))}; config hash: {escape(str(info['config_hash']))}; "
        f"threads: {escape(str(info['threads']))}</p>",
        f"<table><thead><tr><th>package</th><th>version</th></tr></thead><tbody>{versions}</tbody></table>",
        f"<pre>{escape(json.dumps(info['config'], indent=2, default=str))}</pre>",
        "</details>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
