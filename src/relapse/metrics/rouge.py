"""ROUGE-L through the ``rouge-score`` package, configured as MUSE uses it (no stemmer).

``rouge-score`` lower-cases, keeps ASCII letters and digits only, and splits on everything else; using the
package rather than our own LCS keeps the numbers identical to published MUSE results.
"""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(reference: str, prediction: str) -> tuple[float, float]:
    """ROUGE-L ``(F1, recall)`` of ``prediction`` against ``reference``."""
    score = _scorer().score(reference, prediction)["rougeL"]
    return float(score.fmeasure), float(score.recall)
