"""TOFU's metrics as pure functions of per-item numbers, defined as open-unlearning defines them.

TOFU (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs") reports two headline numbers:
**forget quality**, how far the unlearned model's truth ratios on the forget set are from a model
retrained without it, and **model utility**, a harmonic mean of nine scores on the retain set and on two
general-knowledge sets (real authors, world facts). open-unlearning (github locuslab/open-unlearning) is
the implementation most papers now report, so each function here follows it, down to its small epsilons.
Nothing here runs a model: the inputs are per-item mean answer-token NLLs (``relapse.metrics.scoring``
gives them), truth ratios, scores, or one batch's logits and labels.

Sources (facts and formulas read there; no code copied), open-unlearning at commit d3d7cf9 (Dec 2025):

- ``src/evals/metrics/utils.py``: ``evaluate_probability`` (per item ``avg_loss`` = mean cross-entropy
  over the label tokens, ``prob`` = exp(-avg_loss)); ``aggregate_to_1D`` (several answers per item are
  averaged over all axes but the first); ``tokenwise_vocab_logprobs`` (teacher-forced distributions for
  the labelled tokens **except the last one**, "to ignore eos prediction").
- ``src/evals/metrics/memorization.py``: ``probability``, ``probability_w_options`` (normalised
  probability), ``truth_ratio`` with its ``closer_to_1_better`` and ``true_better`` aggregators,
  ``exact_memorization``, ``extraction_strength``.
- ``src/evals/metrics/privacy.py``: ``ks_test`` (forget quality = ``scipy.stats.ks_2samp(...).pvalue``
  with the default two-sided alternative and ``method="auto"``).
- ``src/evals/metrics/utility.py``: ``hm_aggregate`` (model utility = ``scipy.stats.hmean``).
- ``configs/eval/tofu_metrics/``: ``forget_Truth_Ratio.yaml`` (paraphrased vs perturbed answers,
  ``closer_to_1_better``), ``retain_Truth_Ratio.yaml`` (paraphrased vs perturbed, ``true_better``),
  ``ra_Truth_Ratio.yaml`` and ``wf_Truth_Ratio.yaml`` (the *original* answer vs perturbed, ``true_better``),
  ``ra_Q_A_Prob_normalised.yaml`` / ``wf_Q_A_Prob_normalised.yaml`` (answer vs perturbed options),
  ``forget_quality.yaml`` (the retrained model's forget truth ratios as reference), ``model_utility.yaml``
  (the nine components), ``retain_Q_A_ROUGE.yaml`` (``rougeL_recall``); ``configs/data/datasets/TOFU_QA_*``
  for which answer field each set uses.
- The original TOFU code, locuslab/tofu ``aggregate_eval_stat.py``: the same numbers with the ratio the
  other way up (``exp(mean perturbed NLL - paraphrased NLL)``, no epsilons); the KS p-value does not
  depend on the direction (a monotone transform of both samples), and the aggregations agree.

Extraction strength is from Carlini et al. (2021) and exact memorisation from Tirumala et al. (2022), both
as used for unlearning by Wang et al. (2025) and implemented by open-unlearning (attributions from its
``docs/links.md``).

The KS test is implemented here because scipy is not a runtime dependency of relapse (only the test
extra pulls it in); ``tests/test_tofu_metrics.py`` checks it against ``scipy.stats.ks_2samp``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

#: The epsilon open-unlearning adds to denominators (truth ratio, its inverse, normalised probability).
#: It matters only when a probability is tiny: a collapsed model with a paraphrased-answer NLL of 25
#: (probability 1.4e-11) gets a truth ratio about 8 times smaller than the plain ratio. Pass ``eps=0``
#: for the original TOFU code's plain ratios.
OU_EPS = 1e-10

#: The label value that marks a token outside the answer (prompt, padding), as in transformers.
IGNORE_INDEX = -100

#: open-unlearning's ``model_utility.yaml``, in its order: probability, ROUGE-L recall and truth ratio
#: (``true_better``) on the retain set, then on real authors and world facts (normalised probability
#: there).
MODEL_UTILITY_COMPONENTS = (
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised",
    "ra_Q_A_ROUGE",
    "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised",
    "wf_Q_A_ROUGE",
    "wf_Truth_Ratio",
)

#: scipy's ``ks_2samp(method="auto")`` computes the exact p-value up to this many items per sample.
KS_MAX_EXACT_N = 10000


# helpers -------------------------------------------------------------------------------------------
def _as_array(values: Any, name: str, ndim: tuple[int, ...] = (1,)) -> np.ndarray:
    """``values`` (numpy, torch, a sequence) as float64, checked for emptiness and dimensions."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim not in ndim:
        raise ValueError(
            f"{name}: expected {' or '.join(f'{d}-D' for d in ndim)} values, got shape {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"{name}: no values (an empty set has no TOFU metric)")
    return array


def _finite(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` unchanged, or a ValueError if it holds NaN: an aggregate of NaN would be a silent NaN."""
    if np.isnan(array).any():
        raise ValueError(f"{name}: {int(np.isnan(array).sum())} of {array.size} values are NaN")
    return array


def _per_item_mean(nll: Any, name: str, items: int) -> np.ndarray:
    """Mean NLL per item over its answers (open-unlearning's ``aggregate_to_1D``): 1-D is one answer
    per item, 2-D is items x answers."""
    array = _as_array(nll, name, ndim=(1, 2))
    if array.shape[0] != items:
        raise ValueError(f"{name}: {array.shape[0]} items, expected {items}")
    return array if array.ndim == 1 else array.mean(axis=1)


# probabilities -------------------------------------------------------------------------------------
def answer_probability(mean_nll: Any) -> np.ndarray:
    """Per-item answer probability: ``exp(-mean answer-token NLL)``.

    The length-normalised (geometric-mean per token) probability of the answer given the question,
    TOFU's "Probability" on the forget and retain sets (open-unlearning ``evaluate_probability``; the
    set's score is the plain mean over items). NaN (an item without answer tokens) stays NaN.
    """
    return np.exp(-_as_array(mean_nll, "answer_probability"))


def normalised_probability(correct_nll: Any, perturbed_nll: Any, eps: float = OU_EPS) -> np.ndarray:
    """Per-item probability of the correct option among the options (real authors and world facts).

    ``p_c / (p_c + sum_k p_k + eps)`` where ``p = exp(-mean answer-token NLL)`` of the correct answer
    (the ``answer`` field, not a paraphrase) and of each perturbed answer ``k``
    (open-unlearning ``probability_w_options``; the original TOFU code has the same form without eps).
    These sets are general knowledge the model should keep, so the raw probability of a long answer
    says little; the share against plausible wrong options does. ``perturbed_nll`` is items x options
    (or 1-D for one option).
    """
    correct = _as_array(correct_nll, "normalised_probability (correct)")
    perturbed = _as_array(perturbed_nll, "normalised_probability (perturbed)", ndim=(1, 2))
    if perturbed.shape[0] != correct.shape[0]:
        raise ValueError(
            f"normalised_probability: {perturbed.shape[0]} perturbed rows for {correct.shape[0]} items"
        )
    p_correct = np.exp(-correct)
    p_wrong = np.exp(-perturbed)
    p_wrong = p_wrong if p_wrong.ndim == 1 else p_wrong.sum(axis=1)
    return p_correct / (p_correct + p_wrong + eps)


# truth ratio ---------------------------------------------------------------------------------------
def truth_ratio(correct_nll: Any, perturbed_nll: Any, eps: float = OU_EPS) -> np.ndarray:
    """Per-item truth ratio: how likely the wrong answers are relative to the right one.

    ``tr = P_wrong / (P_correct + eps)`` with ``P_correct = exp(-NLL_correct)`` and ``P_wrong =
    exp(-mean_k NLL_k)``, the geometric mean of the perturbed answers' length-normalised probabilities
    (open-unlearning ``truth_ratio``, which averages the perturbed answers' mean-token NLLs first via
    ``aggregate_to_1D``). Below 1: the model prefers the truth. "Correct" is the **paraphrased** answer
    on the forget and retain sets and the **original** answer on real authors and world facts (which
    have no paraphrase) — the caller passes the right one. A paraphrase, not the trained answer, so that
    the ratio measures knowledge, not verbatim memory of one wording (Maini et al. 2024).
    """
    correct = _as_array(correct_nll, "truth_ratio (correct)")
    wrong = _per_item_mean(perturbed_nll, "truth_ratio (perturbed)", correct.shape[0])
    return np.exp(-wrong) / (np.exp(-correct) + eps)


def truth_ratio_closer_to_1(ratios: Any, eps: float = OU_EPS) -> float:
    """Forget-set aggregate of truth ratios: ``mean(min(tr, 1 / (tr + eps)))``, higher is better.

    open-unlearning's ``closer_to_1_better``: after unlearning, the right and wrong answers should be
    about equally likely (as for a model that never saw the fact), whichever way the ratio leans.
    """
    tr = _finite(_as_array(ratios, "truth_ratio_closer_to_1"), "truth_ratio_closer_to_1")
    return float(np.mean(np.minimum(tr, 1.0 / (tr + eps))))


def truth_ratio_true_better(ratios: Any) -> float:
    """Utility-set aggregate of truth ratios: ``mean(max(0, 1 - tr))``, higher is better.

    open-unlearning's ``true_better`` for the retain, real-authors and world-facts sets: the model
    should keep preferring the true answer (tr well below 1); a ratio of 1 or more scores 0.
    """
    tr = _finite(_as_array(ratios, "truth_ratio_true_better"), "truth_ratio_true_better")
    return float(np.mean(np.maximum(0.0, 1.0 - tr)))


# general-knowledge sets: the answer against its options -------------------------------------------
def option_scores(
    correct_nll: Any, perturbed_nll: Sequence[Any], eps: float = OU_EPS
) -> tuple[np.ndarray, np.ndarray]:
    """Per item of a general-knowledge set (TOFU's real authors, world facts): the normalised probability
    and the truth ratio of the **original** answer against its perturbed answers.

    ``correct_nll`` holds each item's answer NLL (mean over its tokens), ``perturbed_nll[i]`` the NLLs of
    item ``i``'s perturbed answers, as many as it has (the lists may differ in length). The normalised
    probability is :func:`normalised_probability` (``p_answer / (p_answer + sum_k p_k + eps)``), the
    truth ratio :func:`truth_ratio` with the answer itself on the correct side: these sets have no
    paraphrase, and open-unlearning's ``ra_Truth_Ratio``/``wf_Truth_Ratio`` take the answer's
    probability (``ra_Q_A_Prob``) as the correct one. Aggregate the ratios with
    :func:`truth_ratio_true_better`.
    """
    correct = _as_array(correct_nll, "option_scores (correct)")
    if len(perturbed_nll) != correct.size:
        raise ValueError(f"option_scores: {len(perturbed_nll)} perturbed lists for {correct.size} items")
    normalised, ratios = np.empty(correct.size), np.empty(correct.size)
    for i, (answer, options) in enumerate(zip(correct, perturbed_nll, strict=True)):
        row = _as_array(options, f"option_scores (perturbed answers of item {i + 1})")[None, :]
        normalised[i] = normalised_probability([answer], row, eps)[0]
        ratios[i] = truth_ratio([answer], row, eps)[0]
    return normalised, ratios


# forget quality: the two-sample Kolmogorov-Smirnov test --------------------------------------------
def _ks_counts(a: np.ndarray, b: np.ndarray) -> int:
    """The KS statistic times lcm(n, m), as an exact integer: ``max |(n2/g) c1 - (n1/g) c2|`` over the
    pooled values, where ``c1``, ``c2`` count each sample's values ``<=`` that value (so ties between
    the samples move both empirical CDFs at once)."""
    n1, n2 = a.size, b.size
    g = math.gcd(n1, n2)
    pooled = np.concatenate([a, b])
    c1 = np.searchsorted(a, pooled, side="right").astype(np.int64)
    c2 = np.searchsorted(b, pooled, side="right").astype(np.int64)
    return int(np.abs((n2 // g) * c1 - (n1 // g) * c2).max())


def _ks_exact_sf(n1: int, n2: int, h: int) -> float:
    """Exact ``P(D >= h / lcm(n1, n2))`` under the null, by counting lattice paths.

    The pooled sample's order is a uniformly random path from (0, 0) to (n1, n2) with unit steps; the
    statistic reaches ``h/lcm`` exactly when the path touches a point with ``|(n2/g) i - (n1/g) j| >= h``.
    The probability is summed over the first such point: (paths that stayed strictly inside up to the
    step into it) x (all completions) / C(n1 + n2, n1). Every term is positive, so small p-values keep
    their relative precision (``1 - P(inside)`` would not). Rows are rescaled so counts never overflow.
    """
    if h <= 0:
        return 1.0
    if n1 > n2:  # one row per item of the smaller sample; the statistic is symmetric
        n1, n2 = n2, n1
    g = math.gcd(n1, n2)
    a, b = n2 // g, n1 // g  # the point (i, j) is inside when |a*i - b*j| < h
    total = n1 + n2
    log_fact = np.array([math.lgamma(k + 1.0) for k in range(total + 1)])
    log_total = log_fact[total] - log_fact[n1] - log_fact[n2]

    def log_completions(i: int, j: np.ndarray) -> np.ndarray:
        """log C((n1 - i) + (n2 - j), n1 - i): the paths from (i, j) to the end, minus log C(total, n1)."""
        return log_fact[total - i - j] - log_fact[n1 - i] - log_fact[n2 - j] - log_total

    def band(i: int) -> tuple[int, int]:
        """The inside j's of row i: a*i - h < b*j < a*i + h, clipped to [0, n2]."""
        lo = max(0, (a * i - h) // b + 1)
        hi = min(n2, -((-(a * i + h)) // b) - 1)
        return lo, hi

    outside = 0.0
    row = np.zeros(n2 + 2)  # paths staying inside, row i-1, scaled by exp(-scale)
    scale = 0.0
    prev_lo, prev_hi = 0, -1
    with np.errstate(divide="ignore"):
        for i in range(n1 + 1):
            lo, hi = band(i)
            if i > 0 and lo > prev_lo:  # steps up from row i-1 that land below this row's band
                js = np.arange(prev_lo, min(lo, prev_hi + 1))
                terms = np.log(row[js]) + scale + log_completions(i, js)
                outside += float(np.exp(terms).sum())
            new = np.zeros(n2 + 2)
            if i == 0:
                new[lo : hi + 1] = 1.0
            elif lo <= hi:
                new[lo : hi + 1] = np.cumsum(row[lo : hi + 1])
            if lo <= hi < n2:  # the step right from the band's top leaves it
                j = np.array([hi + 1])
                outside += float(np.exp(np.log(new[hi]) + scale + log_completions(i, j))[0])
            peak = new.max()
            if peak > 0:
                new /= peak
                scale += math.log(peak)
            row, prev_lo, prev_hi = new, lo, hi
    return min(1.0, outside)


def _kolmogorov_sf(n: int, d: float) -> float:
    """``P(D_n >= d)`` for the one-sample two-sided statistic of ``n`` items (scipy's ``kstwo.sf``).

    Split as Simard & L'Ecuyer (2011), "Computing the two-sided Kolmogorov-Smirnov distribution", split
    it for the survival function, and as scipy follows them: in the tail (``d >= 0.5``, or ``n d^2 > 4``
    for ``n <= 140``, ``n d^2 >= 2.2`` above; 0 from ``n d^2 >= 370`` there) twice the exact one-sided
    tail of Birnbaum & Tingey (1951) (exact for ``d >= 0.5``; otherwise the two sides exceeding ``d``
    together is of the order of the square); elsewhere 1 - the CDF by the Durbin matrix of Marsaglia,
    Tsang & Wang (2003), "Evaluating Kolmogorov's distribution" (scipy uses Pelz-Good's expansion for
    large ``n``, which agrees to about 1e-6 relative). The matrix has about 2 n d rows, so this is slow
    for samples of hundreds of thousands.
    """
    if d >= 1.0:
        return 0.0
    if n * d <= 0.5:
        return 1.0
    nd2 = n * d * d
    if d >= 0.5 or (n <= 140 and nd2 > 4.0) or (n > 140 and nd2 >= 2.2):
        if n > 140 and nd2 >= 370.0:
            return 0.0
        j = np.arange(0, math.floor(n * (1.0 - d)) + 1)
        with np.errstate(divide="ignore"):
            log_terms = (
                math.lgamma(n + 1.0)
                - np.array([math.lgamma(x + 1.0) + math.lgamma(n - x + 1.0) for x in j])
                + (n - j) * np.log(np.maximum(1.0 - d - j / n, 0.0))
                + (j - 1) * np.log(d + j / n)
            )
        return min(1.0, 2.0 * d * float(np.exp(log_terms).sum()))
    k = math.floor(n * d) + 1
    m = 2 * k - 1
    h = k - n * d
    diff = np.arange(m)[:, None] - np.arange(m)[None, :] + 1  # i - j + 1
    matrix = (diff >= 0).astype(np.float64)
    powers = h ** np.arange(1, m + 1)
    matrix[:, 0] -= powers
    matrix[m - 1, :] -= powers[::-1]
    if 2 * h - 1 > 0:
        matrix[m - 1, 0] += (2 * h - 1) ** m
    log_fact = np.array([math.lgamma(x + 1.0) for x in range(m + 1)])
    matrix = np.where(diff > 0, matrix / np.exp(log_fact[np.maximum(diff, 0)]), matrix)
    # matrix ** n by squaring, with the scale kept apart as a log
    result, log_scale = np.eye(m), 0.0
    base, base_log, power = matrix, 0.0, n
    while power:
        if power & 1:
            result = result @ base
            log_scale += base_log
            peak = np.abs(result).max()
            result, log_scale = result / peak, log_scale + math.log(peak)
        power >>= 1
        if power:
            base = base @ base
            base_log *= 2
            peak = np.abs(base).max()
            base, base_log = base / peak, base_log + math.log(peak)
    entry = result[k - 1, k - 1]
    if entry <= 0:
        return 1.0
    log_cdf = math.log(entry) + log_scale + math.lgamma(n + 1.0) - n * math.log(n)
    return float(min(1.0, max(0.0, -math.expm1(log_cdf))))


def ks_2samp(sample1: Any, sample2: Any, method: str = "auto") -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov-Smirnov test: ``(statistic, p-value)``, as ``scipy.stats.ks_2samp``.

    ``method`` has scipy's meaning: ``"exact"`` counts lattice paths (here always, for any sizes; scipy
    falls back to ``"asymp"`` when its own exact computation overflows), ``"asymp"`` is the one-sample
    Kolmogorov distribution of ``round(n1 n2 / (n1 + n2))`` items at the statistic, and ``"auto"`` is
    exact when neither sample has more than 10,000 items (every TOFU split), asymp otherwise. Ties,
    within and between samples, are handled as scipy does (the empirical CDFs count values ``<=``).
    NaN raises ValueError (scipy would return NaN), and so does an empty sample; ``"asymp"`` with one
    item on each side uses one effective item where scipy rounds 1/2 to 0 and returns NaN.
    """
    if method not in ("auto", "exact", "asymp"):
        raise ValueError(f"ks_2samp: method must be 'auto', 'exact' or 'asymp', not {method!r}")
    a = np.sort(_finite(_as_array(sample1, "ks_2samp (sample 1)"), "ks_2samp (sample 1)"))
    b = np.sort(_finite(_as_array(sample2, "ks_2samp (sample 2)"), "ks_2samp (sample 2)"))
    n1, n2 = a.size, b.size
    h = _ks_counts(a, b)
    lcm = n1 * n2 // math.gcd(n1, n2)
    statistic = h / lcm
    if method == "auto":
        method = "exact" if max(n1, n2) <= KS_MAX_EXACT_N else "asymp"
    if method == "exact":
        return statistic, _ks_exact_sf(n1, n2, h)
    effective = max(1, round(n1 * n2 / (n1 + n2)))  # scipy's round(0.5) = 0 for 1 vs 1 item gives NaN
    return statistic, _kolmogorov_sf(effective, statistic)


def forget_quality(unlearned_ratios: Any, retrained_ratios: Any, method: str = "auto") -> float:
    """TOFU's forget quality: the KS-test p-value between two models' per-item forget truth ratios.

    ``unlearned_ratios`` are the unlearned model's :func:`truth_ratio` values on the forget set,
    ``retrained_ratios`` those of the model retrained on the retain set only (open-unlearning
    ``ks_test`` via ``forget_quality.yaml``). A high p-value means the two distributions cannot be told
    apart: the forget set looks to the unlearned model as it does to a model that never saw it. The
    per-item ratios, not their aggregate, are compared; their direction (wrong/right or right/wrong)
    does not change the p-value.
    """
    return ks_2samp(unlearned_ratios, retrained_ratios, method=method)[1]


# model utility -------------------------------------------------------------------------------------
def harmonic_mean(values: Any) -> float:
    """``n / sum(1 / x)``; 0 if any value is 0 (as ``scipy.stats.hmean``). Negative values or NaN raise."""
    array = _finite(_as_array(values, "harmonic_mean"), "harmonic_mean")
    if (array < 0).any():
        raise ValueError(f"harmonic_mean: negative values {array[array < 0].tolist()}")
    if (array == 0).any():
        return 0.0
    return float(array.size / np.sum(1.0 / array))


def model_utility(scores: Mapping[str, float] | Sequence[float] | np.ndarray) -> float:
    """TOFU's model utility: the harmonic mean of its component scores (open-unlearning ``hm_aggregate``).

    The components (``MODEL_UTILITY_COMPONENTS``) are the mean answer probability, mean ROUGE-L recall
    and :func:`truth_ratio_true_better` on the retain set, and the same three on real authors and world
    facts with :func:`normalised_probability` in place of the probability (see :func:`option_scores`).
    A harmonic mean, so one collapsed ability (a 0) sinks the whole score. A mapping must name exactly
    those nine components; a sequence is taken as given (any number of scores, for benchmarks with
    fewer sets: the engine's ``tofu_model_utility`` passes the retain set's three and three per utility
    QA set the benchmark has).
    """
    if isinstance(scores, Mapping):
        missing = [name for name in MODEL_UTILITY_COMPONENTS if name not in scores]
        extra = [name for name in scores if name not in MODEL_UTILITY_COMPONENTS]
        if missing or extra:
            raise ValueError(f"model_utility: missing components {missing}, unknown components {extra}")
        values = [float(scores[name]) for name in MODEL_UTILITY_COMPONENTS]
    else:
        values = scores
    return harmonic_mean(values)


# memorisation: exact memorisation and extraction strength -----------------------------------------
def _token_correctness(logits: torch.Tensor, labels: torch.Tensor, drop_last: bool) -> list[torch.Tensor]:
    """Per item, whether the teacher-forced argmax prediction of each answer token is that token.

    ``logits`` is batch x positions x vocabulary and ``labels`` batch x positions, aligned with the
    inputs as for transformers' loss (the prediction of the token at position t is the logits at t-1),
    with ``IGNORE_INDEX`` outside the answer; a label at position 0 has no prediction and is skipped.
    ``drop_last`` leaves out each item's last answer token, as open-unlearning's
    ``tokenwise_vocab_logprobs`` does (its last label token is the EOS). open-unlearning takes the
    contiguous span from the first to the last answer token; here the answer positions themselves, which
    is the same for contiguous answers.
    """
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits batch x positions x vocab and labels batch x positions, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if labels.shape[0] == 0:
        raise ValueError("no items (an empty batch has no memorisation score)")
    predictions = logits[:, :-1].argmax(dim=-1)  # predictions[b, t - 1] is the guess for labels[b, t]
    targets = labels[:, 1:]
    out = []
    for b in range(labels.shape[0]):
        positions = (targets[b] != IGNORE_INDEX).nonzero(as_tuple=True)[0]
        if drop_last:
            positions = positions[:-1]
        out.append((predictions[b, positions] == targets[b, positions]).cpu())
    return out


def exact_memorization(logits: torch.Tensor, labels: torch.Tensor, drop_last: bool = True) -> np.ndarray:
    """Per-item exact memorisation: the share of answer tokens the model predicts exactly (argmax,
    teacher-forced), open-unlearning ``exact_memorization`` (Tirumala et al. 2022).

    NaN for an item without answer tokens, which open-unlearning leaves out of its mean (aggregate with
    ``np.nanmean``). See :func:`_token_correctness` for the layout and ``drop_last``.
    """
    return np.array(
        [
            float(c.double().mean()) if c.numel() else float("nan")
            for c in _token_correctness(logits, labels, drop_last)
        ]
    )


def extraction_strength_of(correct: Any, open_unlearning_floor: bool = True) -> float:
    """Extraction strength of one item from its per-token correctness: ``1 - k / n``.

    ``k`` is the shortest answer prefix from which the model's greedy continuation reproduces the rest
    of the answer exactly, ``n`` the answer's length (Carlini et al. 2021; open-unlearning
    ``extraction_strength``). With teacher-forced argmax predictions, "the continuation from k reproduces
    the rest" is "every prediction from k on is right", so ``k = n - r`` for the run ``r`` of right
    predictions at the end, and the score is ``r / n``: 1 when the whole answer comes out from the
    question alone.

    When even the last token is wrong no ``k < n`` works. open-unlearning then reports ``1/n`` (its loop
    over k ends at ``n - 1`` without finding one), not 0; ``open_unlearning_floor=False`` gives 0
    instead. An empty answer scores 0, as in open-unlearning.
    """
    flags = np.asarray(
        correct.detach().cpu().numpy() if isinstance(correct, torch.Tensor) else correct, dtype=bool
    )
    if flags.ndim != 1:
        raise ValueError(
            f"extraction_strength_of: expected 1-D per-token correctness, got shape {flags.shape}"
        )
    n = flags.size
    if n == 0:
        return 0.0
    wrong = np.flatnonzero(~flags)
    run = n if wrong.size == 0 else n - 1 - int(wrong[-1])
    if run == 0 and open_unlearning_floor:
        run = 1
    return run / n


def extraction_strength(
    logits: torch.Tensor, labels: torch.Tensor, drop_last: bool = True, open_unlearning_floor: bool = True
) -> np.ndarray:
    """Per-item extraction strength (:func:`extraction_strength_of`) of one batch's logits and labels
    (layout and ``drop_last`` as in :func:`_token_correctness`)."""
    return np.array(
        [
            extraction_strength_of(c, open_unlearning_floor=open_unlearning_floor)
            for c in _token_correctness(logits, labels, drop_last)
        ]
    )
