"""What each metric is, declared once: its direction, its ideal, what it measures and how the audit uses it.

The engine (:mod:`relapse.metrics.engine`) computes the metrics and stamps every result with the
direction and ideal declared here; the audit (recovery ratios, verdicts, the utility gate) and the report
(goals, plots) read them from here instead of keeping their own lists of names. This module imports
nothing heavy, so the report can use it without loading torch.

The order of :data:`METRICS` is meaningful: it is the order of the recovery table in ``results.json`` and
the order of preference among the metrics a verdict may follow, and among the utility metrics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

#: What a metric measures: what the model still knows of the forget set, what it kept of everything
#: else, or whether the forget set can be told from unseen text (membership inference).
MetricKind = Literal["forgetting", "utility", "privacy"]

#: The Min-K% share (in percent) of the membership score that PrivLeak uses (MUSE's Min-40%; the
#: engine's :data:`relapse.metrics.mia.PRIVLEAK_K`). The audit follows this K only among the Min-K% AUCs.
PRIVLEAK_PERCENT = 40

_MINK = re.compile(r"mia_mink(pp)?_(\d+)$")

#: What TOFU measures on each general-knowledge (utility) QA set: the normalised probability, ROUGE-L
#: recall and truth ratio, as ``tofu_prob_<set>``, ``tofu_rouge_<set>``, ``tofu_truth_ratio_<set>``.
TOFU_SET_MEASURES = ("prob", "rouge", "truth_ratio")
#: The retain-set components of TOFU's model utility, the first three of every utility's components.
TOFU_RETAIN_UTILITY = ("tofu_prob_retain", "tofu_rouge_retain", "tofu_truth_ratio_retain")
#: A utility set's name as the benchmark format allows it (relapse.data.benchmark's ``UTILITY_NAME``),
#: less its reserved names: forget and retain have TOFU metrics of fixed names, holdout none.
_TOFU_SET = re.compile(r"tofu_(prob|rouge|truth_ratio)_([a-z][a-z0-9_]*)$")
_NOT_A_SET = ("forget", "retain", "holdout")


@dataclass(frozen=True)
class MetricInfo:
    """One metric's declaration.

    ``higher_is_better`` is False for what a model should forget (VerbMem and KnowMem on the forget set),
    True for utility, and None for two-sided numbers whose ideal is ``best`` (an AUC of 0.5, a PrivLeak of
    0). ``min_gap`` is the smallest target-unlearned gap worth a recovery ratio, on the metric's own
    scale (its noise floor). ``recovery``: the audit computes the recovered share of its gap.
    ``verdict``: a verdict may follow it without being told to (the one-sided forget metrics; the
    two-sided ones are noisy and their ideal is the retrained model's value, not the lowest).
    ``plot_rank``: the report's plots prefer the forget metric of the lowest rank that was measured.
    ``per_forget_question``: its value is the mean of one value per forget QA pair, every pair in
    ``forget_qa`` order (its ``item_values``), so it can be read on some of the questions (relearning on
    half of them). TOFU's forget metrics are not: they score the pairs that have answer variants.
    """

    name: str
    kind: MetricKind
    higher_is_better: bool | None
    best: float | None = None
    min_gap: float = 0.0
    recovery: bool = False
    verdict: bool = False
    plot_rank: int | None = None
    per_forget_question: bool = False

    @property
    def two_sided(self) -> bool:
        """Whether the ideal is a value in the middle (``best``) rather than an end of the scale."""
        return self.higher_is_better is None

    @property
    def goal(self) -> str | None:
        """``higher``, ``lower`` or ``near X``, the way a table says which way the metric should go."""
        if self.higher_is_better is True:
            return "higher"
        if self.higher_is_better is False:
            return "lower"
        return None if self.best is None else f"near {self.best:g}"


def _membership(name: str, recovery: bool = False) -> MetricInfo:
    """A membership AUC: forget texts against holdout ones, ideally 0.5 (the retrained model's)."""
    return MetricInfo(name, "privacy", None, best=0.5, min_gap=0.02, recovery=recovery)


#: Every metric with a fixed name, in the order the audit's recovery table lists them (see the module
#: docstring); ``mia_mink_K`` and ``mia_minkpp_K`` of other K are declared by :func:`metric_info`.
#: Gaps: ROUGE x 100 moves by 1, a share (recall, an AUC) by 0.02 (one question in 50), NLL by 0.05
#: nats, PrivLeak (a percentage) by 5 points (its noise on a forget set of 50 is several points).
METRICS: tuple[MetricInfo, ...] = (
    MetricInfo(
        "knowmem_forget",
        "forgetting",
        False,
        min_gap=1.0,
        recovery=True,
        verdict=True,
        plot_rank=0,
        per_forget_question=True,
    ),
    MetricInfo("verbmem_forget", "forgetting", False, min_gap=1.0, recovery=True, verdict=True, plot_rank=2),
    MetricInfo(
        "recall_forget",
        "forgetting",
        False,
        min_gap=0.02,
        recovery=True,
        verdict=True,
        plot_rank=1,
        per_forget_question=True,
    ),
    MetricInfo("privleak", "privacy", None, best=0.0, min_gap=5.0, recovery=True),
    _membership(f"mia_mink_{PRIVLEAK_PERCENT}", recovery=True),
    _membership("mia_loss", recovery=True),
    _membership(f"mia_minkpp_{PRIVLEAK_PERCENT}", recovery=True),
    _membership("mia_zlib", recovery=True),
    # Higher is better on the forget answers' NLL: the model finds them less likely.
    MetricInfo("nll_forget", "forgetting", True, min_gap=0.05, recovery=True, per_forget_question=True),
    MetricInfo("knowmem_retain", "utility", True, min_gap=1.0),
    MetricInfo("recall_retain", "utility", True, min_gap=0.02),
    MetricInfo("ppl_general", "utility", False),
    MetricInfo("nll_retain", "utility", False, min_gap=0.05),
    _membership("mia_lowercase"),
    # TOFU's metrics (open-unlearning's definitions; docs/metrics.md). Forget quality is a KS p-value, higher
    # when the forget truth ratios look like the retrained model's; its gap is read on its own linear scale,
    # so a model whose forget quality stays under 0.01 (TOFU: distinguishable from retrained) gets no ratio.
    # The truth ratio on the forget set is mean(min(tr, 1/tr)), higher when right and wrong answers are alike.
    MetricInfo("tofu_forget_quality", "forgetting", True, min_gap=0.01, recovery=True),
    MetricInfo("tofu_truth_ratio_forget", "forgetting", True, min_gap=0.02, recovery=True),
    MetricInfo("tofu_prob_forget", "forgetting", False, min_gap=0.02, recovery=True),
    MetricInfo("tofu_exact_mem_forget", "forgetting", False, min_gap=0.02, recovery=True),
    MetricInfo("tofu_extraction_forget", "forgetting", False, min_gap=0.02, recovery=True),
    MetricInfo("tofu_model_utility", "utility", True, min_gap=0.02),
    MetricInfo("tofu_prob_retain", "utility", True, min_gap=0.02),
    MetricInfo("tofu_rouge_retain", "utility", True, min_gap=0.02),
    MetricInfo("tofu_truth_ratio_retain", "utility", True, min_gap=0.02),
)

_BY_NAME = {info.name: info for info in METRICS}


def mink_parameters(name: str) -> tuple[int, bool] | None:
    """``(K, plus_plus)`` of a Min-K% metric name (``mia_mink_40``, ``mia_minkpp_20``; K in 1..100)."""
    match = _MINK.match(name)
    if match and 1 <= int(match.group(2)) <= 100:
        return int(match.group(2)), bool(match.group(1))
    return None


def tofu_set_parameters(name: str) -> tuple[str, str] | None:
    """``(measure, set)`` of a TOFU utility-set metric name (``tofu_rouge_world_facts`` gives
    ``("rouge", "world_facts")``), or None for any other name."""
    match = _TOFU_SET.match(name)
    if match and match.group(2) not in _NOT_A_SET:
        return match.group(1), match.group(2)
    return None


def tofu_utility_parts(sets: Iterable[str]) -> tuple[str, ...]:
    """The components of TOFU's model utility on a benchmark with utility QA ``sets``: the retain set's
    three, then each set's three in the order of ``sets`` (TOFU: nine, with real_authors and
    world_facts)."""
    return TOFU_RETAIN_UTILITY + tuple(f"tofu_{measure}_{s}" for s in sets for measure in TOFU_SET_MEASURES)


def metric_info(name: str) -> MetricInfo | None:
    """The declaration of metric ``name``, or None for a name this version does not know (an audit
    written by another version may hold one). Min-K% AUCs of any K and the TOFU metrics of any utility
    QA set (all three higher-is-better utility, as on the retain set) are declared here."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    if tofu_set_parameters(name):
        return MetricInfo(name, "utility", True, min_gap=0.02)
    return _membership(name) if mink_parameters(name) else None


def recovery_metrics() -> tuple[str, ...]:
    """The metrics the audit computes recovered shares for, in the recovery table's order."""
    return tuple(info.name for info in METRICS if info.recovery)


def verdict_metrics() -> tuple[str, ...]:
    """The metrics a verdict follows by default, in order of preference (the first measured one)."""
    return tuple(info.name for info in METRICS if info.verdict)


def primary_choices() -> tuple[str, ...]:
    """The metrics an audit may declare as the one its verdicts follow: the one-sided forget metrics."""
    return tuple(info.name for info in METRICS if info.kind == "forgetting" and not info.two_sided)


def utility_gate_metrics() -> tuple[str, ...]:
    """The retain-set metrics (higher = better) that say whether a model kept its utility, in order of
    preference."""
    return tuple(info.name for info in METRICS if info.kind == "utility" and info.higher_is_better is True)


def plot_forget_metrics() -> tuple[str, ...]:
    """The forget metrics the report's plots may follow, in order of preference."""
    ranked = sorted((info for info in METRICS if info.plot_rank is not None), key=lambda i: i.plot_rank)
    return tuple(info.name for info in ranked)


def per_forget_question(name: str) -> bool:
    """Whether ``name`` is a mean over the forget QA pairs (see :class:`MetricInfo`)."""
    info = metric_info(name)
    return bool(info and info.per_forget_question)
