"""Metrics: each returns ``{value, higher_is_better, per_item}``."""

from relapse.metrics.generation import greedy_generate
from relapse.metrics.qa import qa_recall

__all__ = ["greedy_generate", "qa_recall"]
