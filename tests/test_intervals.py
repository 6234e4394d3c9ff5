"""Bootstrap intervals: against SciPy's bootstrap and a plain loop, and the verdicts they decide."""

from __future__ import annotations

import numpy as np
import pytest

from relapse.audit.recovery import RELAPSE_THRESHOLD, finish
from relapse.metrics import bootstrap


def bernoulli(n: int, share: float) -> list[float]:
    """``n`` items of which the first ``round(share * n)`` are 1."""
    hits = round(share * n)
    return [1.0] * hits + [0.0] * (n - hits)


# --- the interval itself ----------------------------------------------------------------------------


def test_mean_interval_agrees_with_scipys_percentile_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    values = np.random.default_rng(3).gamma(2.0, 10.0, size=60)
    ours = bootstrap.mean_interval(values, replicates=20000, seed=1)
    theirs = scipy_stats.bootstrap(
        (values,), np.mean, n_resamples=20000, method="percentile", random_state=2, vectorized=True
    ).confidence_interval
    width = theirs.high - theirs.low
    assert ours[0] == pytest.approx(theirs.low, abs=0.03 * width)
    assert ours[1] == pytest.approx(theirs.high, abs=0.03 * width)


def test_mean_interval_of_a_share_matches_the_normal_approximation():
    values = bernoulli(400, 0.3)  # standard error sqrt(0.3 * 0.7 / 400) = 0.0229
    low, high = bootstrap.mean_interval(values, replicates=20000, seed=0)
    assert low == pytest.approx(0.3 - 1.96 * 0.0229, abs=0.006)
    assert high == pytest.approx(0.3 + 1.96 * 0.0229, abs=0.006)


def test_mean_interval_is_seeded():
    values = bernoulli(30, 0.4)
    assert bootstrap.mean_interval(values, seed=5) == bootstrap.mean_interval(values, seed=5)
    assert bootstrap.mean_interval([], seed=5) is None


def test_paired_share_equals_a_plain_loop_over_the_same_draws():
    rng = np.random.default_rng(0)
    unlearned = rng.uniform(0, 40, 25)
    attacked = unlearned + rng.uniform(0, 30, 25)
    target = rng.uniform(80, 100, 25)
    shares = bootstrap.paired_replicates(
        lambda u, a, t: (a - u) / (t - u), [unlearned, attacked, target], replicates=500, seed=4
    )
    expected = []
    for row in bootstrap.draws(25, 500, seed=4):  # one replicate at a time, sums by hand
        u = sum(unlearned[i] for i in row) / 25
        a = sum(attacked[i] for i in row) / 25
        t = sum(target[i] for i in row) / 25
        expected.append((a - u) / (t - u))
    np.testing.assert_allclose(shares, expected, rtol=1e-12)


def test_paired_share_agrees_with_scipys_paired_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    unlearned = rng.uniform(0, 40, 40)
    attacked = unlearned + rng.uniform(0, 30, 40)
    target = rng.uniform(60, 100, 40)

    def share(u, a, t, axis=-1):
        return (a.mean(axis) - u.mean(axis)) / (t.mean(axis) - u.mean(axis))

    theirs = scipy_stats.bootstrap(
        (unlearned, attacked, target),
        share,
        paired=True,
        n_resamples=20000,
        method="percentile",
        random_state=0,
    ).confidence_interval
    ours = bootstrap.percentile_interval(
        bootstrap.paired_replicates(
            lambda u, a, t: (a - u) / (t - u), [unlearned, attacked, target], 20000, 7
        )
    )
    width = theirs.high - theirs.low
    assert ours[0] == pytest.approx(theirs.low, abs=0.03 * width)
    assert ours[1] == pytest.approx(theirs.high, abs=0.03 * width)


def test_pairing_cancels_what_the_models_share():
    """Items differ a lot in difficulty, the attack adds the same 10 points to each: paired, the shift
    is known exactly; drawn independently for each model it would be lost in the items' spread."""
    difficulty = np.random.default_rng(2).uniform(0, 50, 50)
    unlearned, attacked, target = difficulty, difficulty + 10, difficulty + 50
    paired = bootstrap.percentile_interval(
        bootstrap.paired_replicates(lambda u, a, t: (a - u) / (t - u), [unlearned, attacked, target])
    )
    assert paired == pytest.approx((0.2, 0.2))
    rng = np.random.default_rng(0)
    independent = [
        (attacked[rng.integers(0, 50, 50)].mean() - unlearned[rng.integers(0, 50, 50)].mean())
        / (target[rng.integers(0, 50, 50)].mean() - unlearned[rng.integers(0, 50, 50)].mean())
        for _ in range(2000)
    ]
    low, high = bootstrap.percentile_interval(np.array(independent))
    assert high - low > 0.2


def test_auc_interval_equals_a_loop_over_the_same_draws_with_musees_auc():
    """Forget and holdout resampled separately; each replicate's AUC computed the slow way, by
    relapse.metrics.mia.membership_auc (ties count a half), on the very same draws."""
    from relapse.metrics.mia import membership_auc

    rng = np.random.default_rng(5)
    forget = np.round(rng.normal(0.0, 1.0, 30), 1)  # rounded: ties happen
    holdout = np.round(rng.normal(0.4, 1.0, 25), 1)
    ours = bootstrap.auc_interval(forget, holdout, replicates=400, seed=9)
    by_hand = [
        membership_auc(forget[f].tolist(), holdout[h].tolist())
        for f, h in zip(bootstrap.draws(30, 400, 9), bootstrap.draws(25, 400, 10), strict=True)
    ]
    assert ours == pytest.approx(bootstrap.percentile_interval(np.array(by_hand)), abs=1e-12)
    low, high = ours
    assert low < membership_auc(forget.tolist(), holdout.tolist()) < high
    percent = bootstrap.auc_interval(forget, holdout, lambda auc: (auc - 0.5) / 0.5 * 100, 400, 9)
    assert percent == pytest.approx(((low - 0.5) * 200, (high - 0.5) * 200))


def test_perplexity_interval_equals_a_loop_over_the_same_draws():
    rng = np.random.default_rng(2)
    tokens = rng.integers(5, 40, 20)
    nll_sums = tokens * rng.uniform(1.0, 3.0, 20)
    ours = bootstrap.perplexity_interval(tokens, nll_sums, replicates=300, seed=4)
    by_hand = [
        np.exp(sum(nll_sums[i] for i in row) / sum(tokens[i] for i in row))
        for row in bootstrap.draws(20, 300, 4)
    ]
    assert ours == pytest.approx(bootstrap.percentile_interval(np.array(by_hand)), rel=1e-12)
    assert ours[0] < np.exp(nll_sums.sum() / tokens.sum()) < ours[1]


def test_too_many_undefined_replicates_give_no_interval():
    values = np.array([0.1] * 90 + [np.nan] * 10)
    assert bootstrap.percentile_interval(values) is None
    assert bootstrap.percentile_interval(np.array([0.1] * 97 + [np.nan] * 3)) == pytest.approx((0.1, 0.1))


def test_items_needed_scales_with_the_square_of_the_width():
    assert bootstrap.items_needed(50, half_width=0.2, wanted_half_width=0.1) == 200
    assert bootstrap.items_needed(50, half_width=0.2, wanted_half_width=0.0) is None


# --- verdicts decided by intervals ---------------------------------------------------------------------

ATTACKS = ["rtn-w4-g128", "relearn-retain-25", "noise-like-rtn-w4-g128"]


def item_results(unlearned: dict[str, list[float]], n: int, retrained_relearn: float = 0.0) -> dict:
    """An audit of one unlearned model ``u`` on recall_forget with per-item values: the target answers
    every item, the retrained and the unlearned model none, and ``unlearned[attack]`` is the attacked
    unlearned model's items (missing attacks: none answered). Relearning teaches the retrained model
    ``retrained_relearn`` of the items."""
    items = {
        "target": {attack: [1.0] * n for attack in ["none", *ATTACKS]},
        "retrained": {attack: [0.0] * n for attack in ["none", *ATTACKS]},
        "u": {attack: unlearned.get(attack, [0.0] * n) for attack in ["none", *ATTACKS]},
    }
    items["retrained"]["relearn-retain-25"] = bernoulli(n, retrained_relearn)
    cells = {
        f"{label}|{attack}": {
            "model": label,
            "attack": attack,
            "metrics": {
                "recall_forget": {
                    "value": float(np.mean(values)),
                    "higher_is_better": False,
                    "best": None,
                    "views": {},
                    "item_values": values,
                }
            },
        }
        for label, per_attack in items.items()
        for attack, values in per_attack.items()
    }
    return finish(
        {
            "kind": "relapse-audit",
            "config": {"attacks": list(ATTACKS), "metrics": ["recall_forget"]},
            "models": {
                "target": {"role": "target", "path": "/t"},
                "retrained": {"role": "retrained", "path": "/r"},
                "u": {"role": "unlearned", "path": "/u"},
            },
            "cells": cells,
            "seed": 0,
        }
    )


def test_every_cell_gets_its_interval():
    results = item_results({"rtn-w4-g128": bernoulli(100, 0.5)}, n=100)
    interval = results["intervals"]["u|rtn-w4-g128"]["recall_forget"]
    assert interval == pytest.approx(bootstrap.mean_interval(bernoulli(100, 0.5), seed=0))
    assert results["intervals"]["target|none"]["recall_forget"] == [1.0, 1.0]
    assert "interval" not in results["cells"]["u|rtn-w4-g128"]["metrics"]["recall_forget"]  # cells: measured


def test_a_clear_recovery_relapses_with_its_interval():
    results = item_results({"rtn-w4-g128": bernoulli(100, 0.5)}, n=100)
    row = results["recovery"]["u"]["rtn-w4-g128"]
    low, high = row["recall_forget:interval"]
    # The quantized target still answers every item: the gap kept is 1 - share, replicate by replicate.
    assert row["recall_forget:kept_interval"] == pytest.approx([1 - high, 1 - low])
    assert low > RELAPSE_THRESHOLD and low < 0.5 < high
    found = results["verdicts"]["u"]
    assert found["status"] == "relapses"
    assert found["relapses"][0]["interval"] == [low, high]
    assert found["text"].startswith(
        f"rtn-w4-g128 brings back 50% [{round(low * 100)}%, {round(high * 100)}%]"
    )


def test_a_small_recovery_with_a_tight_interval_holds():
    results = item_results({"rtn-w4-g128": bernoulli(200, 0.02)}, n=200)
    assert results["recovery"]["u"]["rtn-w4-g128"]["recall_forget:net_interval"][1] < RELAPSE_THRESHOLD
    assert results["verdicts"]["u"]["status"] == "holds"


def test_too_few_items_are_inconclusive_and_say_how_many_would_do():
    results = item_results({"rtn-w4-g128": bernoulli(10, 0.2)}, n=10)  # 20% of 10 items: [0%, 50%]
    found = results["verdicts"]["u"]
    assert found["status"] == "inconclusive" and found["undecided"] == ["rtn-w4-g128"]
    low, high = results["recovery"]["u"]["rtn-w4-g128"]["recall_forget:net_interval"]
    expected = bootstrap.items_needed(10, (high - low) / 2, RELAPSE_THRESHOLD - 0.2)
    assert found["items"] == 10 and found["items_needed"] == expected > 10
    assert found["text"].startswith(
        f"cannot tell on recall_forget with 10 items (about {expected} would be needed)"
    )


def test_a_recovery_the_noise_control_matches_is_not_a_relapse():
    """RTN brings back 40%, but noise of the same size brings back 35% on the same model: the intervals
    overlap, so the grid is not shown to matter (the model does relapse, under the noise itself)."""
    results = item_results(
        {"rtn-w4-g128": bernoulli(40, 0.4), "noise-like-rtn-w4-g128": bernoulli(40, 0.35)}, n=40
    )
    found = results["verdicts"]["u"]
    assert [r["attack"] for r in found["relapses"]] == ["noise-like-rtn-w4-g128"]
    alone = item_results({"rtn-w4-g128": bernoulli(40, 0.4)}, n=40)["verdicts"]["u"]
    assert [r["attack"] for r in alone["relapses"]] == ["rtn-w4-g128"]  # without the noise's recovery


def test_relearning_that_the_retrained_control_matches_is_not_a_relapse():
    """Relearning brings back 45%, and teaches the retrained model 30% of the same items: the net share
    is 15%, and its interval decides."""
    results = item_results({"relearn-retain-25": bernoulli(400, 0.45)}, n=400, retrained_relearn=0.3)
    row = results["recovery"]["u"]["relearn-retain-25"]
    assert row["recall_forget:control"] == pytest.approx(0.3)
    assert row["recall_forget:control_interval"][0] < 0.3 < row["recall_forget:control_interval"][1]
    assert results["verdicts"]["u"]["status"] == "holds"  # net 15% with an upper bound under 25%


def test_the_report_shows_each_decision_coloured_with_its_interval():
    from relapse.report.html import render_html
    from relapse.report.markdown import render_markdown

    results = item_results({"rtn-w4-g128": bernoulli(10, 0.2), "relearn-retain-25": bernoulli(10, 0.0)}, n=10)
    low, high = results["recovery"]["u"]["rtn-w4-g128"]["recall_forget:interval"]
    expected = f"cannot tell 20% [{round(low * 100)}%, {round(high * 100)}%]"
    page = render_html(results, [])
    assert f'<td class="inconclusive">{expected}</td>' in page
    assert '<td class="holds">holds 0% [0%, 0%]</td>' in page
    assert "Cannot tell yet, too few items" in page and 'class="verdict inconclusive"' in page
    markdown = render_markdown(results, [])
    assert f"| u | {expected} | holds 0% [0%, 0%] |" in markdown
    assert (
        "brought back 20.0%" + f" [{round(low * 100)}%, {round(high * 100)}%] of the recall_forget gap"
        in markdown
    )


def test_value_intervals_cover_aucs_privleak_and_perplexity():
    from relapse.audit.recovery import value_intervals

    forget, holdout = [0.1, 0.4, 0.2, 0.9, 0.3], [0.5, 0.8, 0.3, 0.7, 0.6]
    cell = {
        "metrics": {
            "mia_loss": {"value": 0.0, "member_scores": {"forget": forget, "holdout": holdout}},
            "privleak": {
                "value": 0.0,
                "views": {"auc": 0.0, "retrained_auc": 0.6},
                "member_scores": {"forget": forget, "holdout": holdout},
            },
            "ppl_general": {
                "value": 0.0,
                "text_scores": {"tokens": [10, 20, 30], "nll_sums": [20.0, 30.0, 90.0]},
            },
        }
    }
    intervals = value_intervals({"cells": {"m|none": cell}, "seed": 3})["m|none"]
    auc = bootstrap.auc_interval(forget, holdout, seed=3)
    assert intervals["mia_loss"] == pytest.approx(list(auc))
    assert intervals["privleak"] == pytest.approx([(a - 0.6) / 0.6 * 100 for a in auc])
    assert intervals["ppl_general"] == pytest.approx(
        list(bootstrap.perplexity_interval([10, 20, 30], [20, 30, 90], seed=3))
    )
