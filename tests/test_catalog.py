"""The metric declarations (relapse.metrics.catalog) cover the engine's metrics, and the lists the audit
and the report derive from them are the ones they always used (their order is in results.json)."""

from relapse.metrics import mia
from relapse.metrics.catalog import (
    METRICS,
    PRIVLEAK_PERCENT,
    metric_info,
    plot_forget_metrics,
    primary_choices,
    recovery_metrics,
    utility_gate_metrics,
    verdict_metrics,
)
from relapse.metrics.engine import _FIXED, GROUPS


def test_every_engine_metric_is_declared():
    names = set(_FIXED) | {name for group in GROUPS.values() for name in group}
    assert {name for name in names if metric_info(name) is None} == set()
    assert len({info.name for info in METRICS}) == len(METRICS)


def test_min_k_names_are_declared_for_any_k_and_unknown_names_are_not():
    assert metric_info("mia_mink_10").higher_is_better is None and metric_info("mia_minkpp_60").best == 0.5
    assert not metric_info("mia_mink_10").recovery
    assert metric_info("mia_mink_0") is None and metric_info("no_such_metric") is None


def test_privleak_percent_is_the_engines():
    assert round(mia.PRIVLEAK_K * 100) == PRIVLEAK_PERCENT


#: TOFU's forget metrics (added after the others, so every list keeps its order before them).
TOFU_FORGET = (
    "tofu_forget_quality",
    "tofu_truth_ratio_forget",
    "tofu_prob_forget",
    "tofu_exact_mem_forget",
    "tofu_extraction_forget",
)


def test_derived_lists_keep_their_order():
    assert verdict_metrics() == ("knowmem_forget", "verbmem_forget", "recall_forget")
    assert primary_choices() == (
        "knowmem_forget",
        "verbmem_forget",
        "recall_forget",
        "nll_forget",
        *TOFU_FORGET,
    )
    assert recovery_metrics() == (
        "knowmem_forget",
        "verbmem_forget",
        "recall_forget",
        "privleak",
        "mia_mink_40",
        "mia_loss",
        "mia_minkpp_40",
        "mia_zlib",
        "nll_forget",
        *TOFU_FORGET,
    )
    assert utility_gate_metrics() == (
        "knowmem_retain",
        "recall_retain",
        "tofu_model_utility",
        "tofu_prob_retain",
        "tofu_rouge_retain",
        "tofu_truth_ratio_retain",
    )
    assert plot_forget_metrics() == ("knowmem_forget", "recall_forget", "verbmem_forget")


def test_goal_and_two_sided():
    assert metric_info("knowmem_forget").goal == "lower" and metric_info("knowmem_retain").goal == "higher"
    assert metric_info("privleak").goal == "near 0" and metric_info("mia_loss").goal == "near 0.5"
    assert metric_info("privleak").two_sided and not metric_info("nll_forget").two_sided
