"""TOFU's metrics (relapse.metrics.tofu) against independent computations: hand values, scipy's KS test
and harmonic mean, exact path counting with integers, and slow per-token loops."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

from relapse.metrics import tofu


# probabilities -------------------------------------------------------------------------------------
def test_answer_probability_is_exp_of_minus_mean_nll():
    nll = [0.0, math.log(2), math.log(4)]
    np.testing.assert_allclose(tofu.answer_probability(nll), [1.0, 0.5, 0.25], rtol=1e-15)
    np.testing.assert_allclose(tofu.answer_probability(torch.tensor(nll)), [1.0, 0.5, 0.25], rtol=1e-6)
    # An item without answer tokens (NaN NLL) stays NaN: per-item values are not silently dropped.
    assert np.isnan(tofu.answer_probability([float("nan"), 1.0])[0])


def test_normalised_probability_hand_values():
    # correct p = 1/2, two options of p = 1/4 each: 0.5 / (0.5 + 0.25 + 0.25) = 0.5
    value = tofu.normalised_probability([math.log(2)], [[math.log(4), math.log(4)]])
    np.testing.assert_allclose(value, [0.5], rtol=1e-9)
    # One perturbed option per item may come 1-D: p = 1/2 against 1/8 -> 0.8
    np.testing.assert_allclose(tofu.normalised_probability([math.log(2)], [math.log(8)]), [0.8], rtol=1e-9)
    # open-unlearning's epsilon: all probabilities underflow to 0 -> 0, not NaN
    assert tofu.normalised_probability([1e4], [[1e4, 1e4]])[0] == 0.0


def test_normalised_probability_matches_a_loop():
    rng = np.random.default_rng(1)
    correct, perturbed = rng.uniform(0, 5, 30), rng.uniform(0, 5, (30, 4))
    expected = []
    for c, row in zip(correct, perturbed, strict=True):
        wrong = sum(math.exp(-x) for x in row)
        expected.append(math.exp(-c) / (math.exp(-c) + wrong + 1e-10))
    np.testing.assert_allclose(tofu.normalised_probability(correct, perturbed), expected, rtol=1e-12)


# truth ratio ---------------------------------------------------------------------------------------
def test_truth_ratio_uses_the_geometric_mean_of_the_perturbed_answers():
    # paraphrase NLL 1, perturbed NLLs 1 and 3: geometric mean exp(-2), tr = exp(-2)/exp(-1) = exp(-1).
    # (The arithmetic mean of the probabilities would give (1 + e^-2)/2 = 0.57; the inverse ratio e.)
    tr = tofu.truth_ratio([1.0], [[1.0, 3.0]])
    np.testing.assert_allclose(tr, [math.exp(-1)], rtol=1e-8)
    # 1-D perturbed: one perturbed answer per item
    np.testing.assert_allclose(tofu.truth_ratio([2.0, 1.0], [1.0, 2.0]), [math.e, 1 / math.e], rtol=1e-8)


def test_truth_ratio_matches_the_original_tofu_formula():
    # locuslab/tofu: exp(mean perturbed NLL - paraphrased NLL) is right/wrong; open-unlearning's is its
    # inverse (with eps=0 exactly).
    rng = np.random.default_rng(2)
    para, pert = rng.uniform(0.5, 4, 50), rng.uniform(0.5, 4, (50, 5))
    original = np.exp(pert.mean(axis=1) - para)
    np.testing.assert_allclose(tofu.truth_ratio(para, pert, eps=0.0), 1 / original, rtol=1e-12)
    np.testing.assert_allclose(tofu.truth_ratio(para, pert), 1 / original, rtol=1e-8)


def test_truth_ratio_keeps_open_unlearnings_epsilon():
    # A collapsed model: paraphrase NLL 25 (p = 1.4e-11) is comparable to the 1e-10 epsilon.
    tr = tofu.truth_ratio([25.0], [[26.0]])[0]
    assert tr == pytest.approx(math.exp(-26) / (math.exp(-25) + 1e-10), rel=1e-12)
    assert tr < 0.2 * math.exp(-1)  # well below the plain ratio e^-1


def test_truth_ratio_aggregators_hand_values():
    # forget: min(tr, 1/tr): 0.5 -> 0.5, 2 -> 0.5, 1 -> 1 (less the epsilon): mean 2/3
    assert tofu.truth_ratio_closer_to_1([0.5, 2.0, 1.0]) == pytest.approx(2 / 3, rel=1e-9)
    # utility: max(0, 1 - tr): 0.5 -> 0.5, 2 -> 0, 0 -> 1: mean 0.5
    assert tofu.truth_ratio_true_better([0.5, 2.0, 0.0]) == pytest.approx(0.5, rel=1e-12)
    # direction: a model that prefers the truth (tr small) scores high on utility, low on forget
    assert tofu.truth_ratio_true_better([0.1]) == pytest.approx(0.9)
    assert tofu.truth_ratio_closer_to_1([0.1]) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "call",
    [
        lambda: tofu.answer_probability([]),
        lambda: tofu.normalised_probability([], []),
        lambda: tofu.truth_ratio([], []),
        lambda: tofu.truth_ratio_closer_to_1([]),
        lambda: tofu.truth_ratio_true_better(np.array([])),
        lambda: tofu.forget_quality([], [1.0]),
        lambda: tofu.forget_quality([1.0], []),
        lambda: tofu.model_utility([]),
        lambda: tofu.exact_memorization(torch.zeros(0, 3, 5), torch.zeros(0, 3, dtype=torch.long)),
    ],
)
def test_empty_input_raises(call):
    with pytest.raises(ValueError, match=r"no values|no items"):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: tofu.truth_ratio_closer_to_1([0.5, float("nan")]),
        lambda: tofu.truth_ratio_true_better([float("nan")]),
        lambda: tofu.forget_quality([0.5, float("nan")], [0.5, 0.7]),
        lambda: tofu.model_utility([0.5, float("nan")]),
    ],
)
def test_nan_in_an_aggregate_raises(call):
    with pytest.raises(ValueError, match="NaN"):
        call()


def test_shape_mismatches_raise():
    with pytest.raises(ValueError, match="items"):
        tofu.truth_ratio([1.0, 2.0], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="perturbed rows"):
        tofu.normalised_probability([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="1-D"):
        tofu.answer_probability([[1.0]])


# general-knowledge sets ---------------------------------------------------------------------------
def test_option_scores_hand_values_with_ragged_options():
    """Known NLLs: p = exp(-NLL), the answer against 2, 1, 2 and 1 perturbed answers."""
    ln = math.log
    answer = [ln(2), ln(2), 0.0, ln(8)]  # p = 1/2, 1/2, 1, 1/8
    perturbed = [[ln(4), ln(4)], [ln(8)], [ln(2), ln(8)], [ln(2)]]  # p = (1/4, 1/4), 1/8, (1/2, 1/8), 1/2
    normalised, ratios = tofu.option_scores(answer, perturbed)
    # p_a / (p_a + sum_k p_k): 0.5/1, 0.5/0.625, 1/1.625, 0.125/0.625
    np.testing.assert_allclose(normalised, [0.5, 0.8, 1 / 1.625, 0.2], rtol=1e-9)
    # geometric mean of the perturbed p over p_a: (1/4)/(1/2), (1/8)/(1/2), sqrt(1/16)/1, (1/2)/(1/8)
    np.testing.assert_allclose(ratios, [0.5, 0.25, 0.25, 4.0], rtol=1e-9)
    # true_better: mean(max(0, 1 - tr)) = (0.5 + 0.75 + 0.75 + 0) / 4
    assert tofu.truth_ratio_true_better(ratios) == pytest.approx(0.5, rel=1e-9)  # eps: 1e-10 off


def test_option_scores_agree_with_the_rectangular_formulas():
    rng = np.random.default_rng(3)
    answer, perturbed = rng.uniform(0, 5, 20), rng.uniform(0, 5, (20, 3))
    normalised, ratios = tofu.option_scores(answer, list(perturbed))
    np.testing.assert_allclose(normalised, tofu.normalised_probability(answer, perturbed), rtol=1e-12)
    np.testing.assert_allclose(ratios, tofu.truth_ratio(answer, perturbed), rtol=1e-12)
    with pytest.raises(ValueError, match="3 perturbed lists for 2 items"):
        tofu.option_scores([1.0, 2.0], [[1.0], [1.0], [1.0]])
    with pytest.raises(ValueError, match="item 2"):
        tofu.option_scores([1.0, 2.0], [[1.0], []])


# forget quality ------------------------------------------------------------------------------------
def exact_ks_pvalue(a, b) -> Fraction:
    """Two-sided exact KS p-value by brute force: D from the ECDFs in fractions, then the share of all
    C(n1 + n2, n1) orders whose path reaches D, counted with integers."""
    n1, n2 = len(a), len(b)
    pooled = sorted(set(a) | set(b))
    d = max(abs(Fraction(sum(x <= v for x in a), n1) - Fraction(sum(x <= v for x in b), n2)) for v in pooled)
    if d == 0:
        return Fraction(1)
    inside = [[0] * (n2 + 1) for _ in range(n1 + 1)]
    for i in range(n1 + 1):
        for j in range(n2 + 1):
            if abs(Fraction(i, n1) - Fraction(j, n2)) >= d:
                continue
            inside[i][j] = (
                1 if i == j == 0 else (inside[i - 1][j] if i else 0) + (inside[i][j - 1] if j else 0)
            )
    return 1 - Fraction(inside[n1][n2], math.comb(n1 + n2, n1))


def samples(rng, n1, n2, shift, ties):
    a, b = rng.normal(size=n1), rng.normal(loc=shift, size=n2)
    return (np.round(a), np.round(b)) if ties else (a, b)


@pytest.mark.parametrize("ties", [False, True])
def test_ks_exact_matches_integer_path_counting(ties):
    rng = np.random.default_rng(3 + ties)
    for n1, n2 in [(1, 1), (1, 5), (4, 6), (7, 7), (9, 12), (15, 10), (20, 20)]:
        a, b = samples(rng, n1, n2, 1.0, ties)
        expected = exact_ks_pvalue(a.tolist(), b.tolist())
        assert tofu.ks_2samp(a, b, method="exact")[1] == pytest.approx(float(expected), rel=1e-10, abs=1e-300)


def test_ks_exact_keeps_tiny_pvalues_precise():
    # Fully separated samples: p = 2 / C(n1 + n2, n1) exactly (both extreme orders).
    for n1, n2 in [(20, 20), (12, 30), (40, 40)]:
        p = tofu.ks_2samp(np.arange(n1), np.arange(n2) + 1000.5)[1]
        assert p == pytest.approx(2 / math.comb(n1 + n2, n1), rel=1e-10)


@pytest.mark.parametrize("method", ["auto", "exact", "asymp"])
def test_ks_matches_scipy(method):
    rng = np.random.default_rng(5)
    sizes = [(1, 1), (1, 7), (3, 3), (10, 25), (40, 40), (200, 200), (400, 400), (400, 360), (57, 311)]
    for k, (n1, n2) in enumerate(sizes):
        for shift in (0.0, 0.3, 1.5):
            a, b = samples(rng, n1, n2, shift, ties=k % 3 == 0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # scipy's exact -> asymp fallback
                expected = stats.ks_2samp(a, b, method=method)
            statistic, pvalue = tofu.ks_2samp(a, b, method=method)
            if n1 == n2 == 1 and method == "asymp":  # scipy: round(1/2) = 0 items, NaN; here 1 item
                assert math.isnan(expected.pvalue)
                continue
            assert statistic == pytest.approx(expected.statistic, abs=1e-12)
            # scipy's asymp uses Pelz-Good's expansion for n > 140 (here the exact Durbin matrix)
            rel = 1e-4 if method == "asymp" else 1e-9
            assert pvalue == pytest.approx(expected.pvalue, rel=rel, abs=1e-300), (n1, n2, shift, method)


def test_ks_auto_switches_to_asymp_above_ten_thousand_items():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=10_001), rng.normal(0.4, size=40)
    expected = stats.ks_2samp(a, b)  # auto -> asymp in scipy too
    assert tofu.ks_2samp(a, b)[1] == pytest.approx(expected.pvalue, rel=1e-4)
    assert tofu.ks_2samp(a, b)[1] == tofu.ks_2samp(a, b, method="asymp")[1]
    assert tofu.ks_2samp(a, b)[1] != tofu.ks_2samp(a, b, method="exact")[1]


def test_ks_ties_between_the_samples():
    # All values equal: the ECDFs move together, D = 0, p = 1 (scipy agrees).
    assert tofu.ks_2samp([1.0] * 5, [1.0] * 8) == (0.0, 1.0)
    # Hand value: a = {0, 1}, b = {1, 2}. At 0: 1/2 - 0; at 1: 1 - 1/2; at 2: 1 - 1 -> D = 1/2.
    statistic, pvalue = tofu.ks_2samp([0.0, 1.0], [1.0, 2.0])
    assert statistic == 0.5
    assert pvalue == pytest.approx(stats.ks_2samp([0.0, 1.0], [1.0, 2.0]).pvalue)
    with pytest.raises(ValueError, match="method"):
        tofu.ks_2samp([1.0], [2.0], method="approx")


def test_forget_quality_is_the_ks_pvalue_of_the_truth_ratios():
    rng = np.random.default_rng(7)
    unlearned = tofu.truth_ratio(rng.uniform(1, 3, 40), rng.uniform(1, 3, (40, 5)))
    retrained = tofu.truth_ratio(rng.uniform(1.5, 3, 40), rng.uniform(1, 3, (40, 5)))
    fq = tofu.forget_quality(unlearned, retrained)
    assert fq == pytest.approx(stats.ks_2samp(unlearned, retrained).pvalue, rel=1e-9)
    # The ratio's direction does not matter (the original TOFU code used right/wrong; open-unlearning's
    # utils.get_forget_quality uses 1 / (tr + 1e-10)).
    assert tofu.forget_quality(1 / unlearned, 1 / retrained) == pytest.approx(fq, rel=1e-12)
    assert tofu.forget_quality(retrained, retrained) == 1.0


# model utility -------------------------------------------------------------------------------------
def test_model_utility_is_scipys_harmonic_mean():
    rng = np.random.default_rng(8)
    for _ in range(20):
        values = rng.uniform(0.01, 1, 9)
        assert tofu.model_utility(values) == pytest.approx(stats.hmean(values), rel=1e-12)
    # hand value: hmean(1/2, 1/4) = 2 / (2 + 4) = 1/3
    assert tofu.model_utility([0.5, 0.25]) == pytest.approx(1 / 3, rel=1e-15)


def test_model_utility_from_named_components():
    rng = np.random.default_rng(9)
    scores = {
        name: float(v) for name, v in zip(tofu.MODEL_UTILITY_COMPONENTS, rng.uniform(0.1, 1, 9), strict=True)
    }
    shuffled = dict(reversed(list(scores.items())))
    assert tofu.model_utility(shuffled) == pytest.approx(stats.hmean(list(scores.values())), rel=1e-12)
    with pytest.raises(ValueError, match="missing components"):
        tofu.model_utility({k: v for k, v in scores.items() if k != "wf_Truth_Ratio"})
    with pytest.raises(ValueError, match="unknown components"):
        tofu.model_utility({**scores, "forget_Q_A_Prob": 0.5})


def test_model_utility_zero_and_negative():
    values = [0.5, 0.0, 0.9]
    assert tofu.model_utility(values) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert stats.hmean(values) == 0.0
    with pytest.raises(ValueError, match="negative"):
        tofu.model_utility([0.5, -0.1])


# memorisation --------------------------------------------------------------------------------------
def memorisation_batch(seed: int, batch: int = 6, length: int = 14, vocab: int = 11):
    """Logits and labels with a prompt (-100), an answer, right padding (-100), and predictions that are
    right at a random subset of the answer positions (and at every position for one item)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen)
    labels = torch.full((batch, length), tofu.IGNORE_INDEX)
    for b in range(batch):
        start = int(torch.randint(1, 5, (1,), generator=gen))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=gen))
        labels[b, start:end] = torch.randint(0, vocab, (end - start,), generator=gen)
        for t in range(start, end):
            if b == 0 or torch.rand(1, generator=gen) < 0.6:
                logits[b, t - 1, labels[b, t]] = 10.0
    return logits, labels


def reference_correctness(logits, labels, drop_last):
    """Per item and answer token, slowly: is the largest logit at the previous position the token?"""
    out = []
    for b in range(labels.shape[0]):
        positions = [t for t in range(1, labels.shape[1]) if labels[b, t] != tofu.IGNORE_INDEX]
        if drop_last:
            positions = positions[:-1]
        row = []
        for t in positions:
            scores = logits[b, t - 1].tolist()
            row.append(scores.index(max(scores)) == int(labels[b, t]))
        out.append(row)
    return out


def reference_extraction_strength(correct, floor=True):
    """Carlini et al.: the smallest prefix k whose teacher-forced suffix is all right, by trying each k."""
    n = len(correct)
    if n == 0:
        return 0.0
    for k in range(n):
        if all(correct[k:]):
            return 1 - k / n
    return 1 / n if floor else 0.0


@pytest.mark.parametrize("drop_last", [True, False])
def test_exact_memorization_matches_a_loop(drop_last):
    for seed in range(5):
        logits, labels = memorisation_batch(seed)
        expected = [
            sum(row) / len(row) if row else float("nan")
            for row in reference_correctness(logits, labels, drop_last)
        ]
        np.testing.assert_allclose(tofu.exact_memorization(logits, labels, drop_last), expected, rtol=1e-12)
    logits, labels = memorisation_batch(0)
    assert tofu.exact_memorization(logits, labels)[0] == 1.0  # item 0 predicts every token


@pytest.mark.parametrize("drop_last", [True, False])
def test_extraction_strength_matches_a_loop(drop_last):
    for seed in range(5):
        logits, labels = memorisation_batch(seed)
        for floor in (True, False):
            expected = [
                reference_extraction_strength(row, floor)
                for row in reference_correctness(logits, labels, drop_last)
            ]
            got = tofu.extraction_strength(logits, labels, drop_last, open_unlearning_floor=floor)
            np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_extraction_strength_hand_values():
    assert tofu.extraction_strength_of([False, True, True, True]) == 0.75
    assert tofu.extraction_strength_of([True, True, True, True]) == 1.0
    assert tofu.extraction_strength_of([True, False, True, False, True]) == 0.2
    # The last token wrong: open-unlearning's loop leaves k = n - 1, so 1/n; the definition gives 0.
    assert tofu.extraction_strength_of([True, True, False]) == pytest.approx(1 / 3)
    assert tofu.extraction_strength_of([True, True, False], open_unlearning_floor=False) == 0.0
    assert tofu.extraction_strength_of(torch.tensor([False, True])) == 0.5
    assert tofu.extraction_strength_of([]) == 0.0


def test_memorisation_hand_example_and_the_dropped_eos():
    # prompt token, answer tokens 3, 1, 2 (the last standing for EOS); predictions: 3 right, 1 wrong, 2 right
    vocab = 5
    labels = torch.tensor([[-100, 3, 1, 2]])
    logits = torch.zeros(1, 4, vocab)
    for position, token in [(0, 3), (1, 4), (2, 2)]:
        logits[0, position, token] = 1.0
    assert tofu.exact_memorization(logits, labels, drop_last=False)[0] == pytest.approx(2 / 3)
    assert tofu.exact_memorization(logits, labels)[0] == pytest.approx(1 / 2)  # tokens 3, 1 only
    assert tofu.extraction_strength(logits, labels, drop_last=False)[0] == pytest.approx(1 / 3)
    assert tofu.extraction_strength(logits, labels)[0] == pytest.approx(1 / 2)  # [right, wrong]: floor 1/2
    # no answer tokens: EM NaN (open-unlearning leaves it out), ES 0 (as open-unlearning scores it)
    empty = torch.full((1, 4), tofu.IGNORE_INDEX)
    assert np.isnan(tofu.exact_memorization(logits, empty)[0])
    assert tofu.extraction_strength(logits, empty)[0] == 0.0
    with pytest.raises(ValueError, match="batch x positions"):
        tofu.exact_memorization(logits[0], labels)


def test_ks_exact_tail_for_every_threshold():
    # Every attainable threshold h (in units of 1/lcm) for lopsided sizes, where some rows of the
    # lattice have no inside point at all, against integer path counting.
    for n1, n2 in [(2, 9), (7, 3), (5, 6)]:
        g = math.gcd(n1, n2)
        lcm = n1 * n2 // g
        for h in range(1, lcm + 2):
            inside = [[0] * (n2 + 1) for _ in range(n1 + 1)]
            for i in range(n1 + 1):
                for j in range(n2 + 1):
                    if abs((n2 // g) * i - (n1 // g) * j) < h:
                        left = inside[i][j - 1] if j else 0
                        inside[i][j] = 1 if i == j == 0 else (inside[i - 1][j] if i else 0) + left
            expected = 1 - Fraction(inside[n1][n2], math.comb(n1 + n2, n1))
            assert tofu._ks_exact_sf(n1, n2, h) == pytest.approx(float(expected), rel=1e-12, abs=1e-15)
