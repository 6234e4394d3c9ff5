"""Report: an audit's results as report.md, a self-contained report.html and PNG plots.

``build_report(directory)`` is what ``relapse report DIR`` runs; the content, Markdown, HTML and plot
modules are pure functions of the results dict, so each can be used and tested on its own.
"""

from relapse.audit.results import load_results
from relapse.report.build import build_report
from relapse.report.plots import attack_bits

__all__ = ["attack_bits", "build_report", "load_results"]
