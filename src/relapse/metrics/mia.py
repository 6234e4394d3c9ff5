"""Membership-inference statistics and PrivLeak, as pure functions of per-token scores.

Convention: every ``*_membership`` function returns a number where **higher means more likely a member**
(seen in training). The AUC then follows MUSE: forget texts are label 0, holdout texts label 1, so a
model that still remembers the forget set gives an AUC near 0, a model that never saw it (the retrained
model) near 0.5, and an over-unlearned model one above 0.5 (it makes the forget set stand out by being
*less* likely than unseen text). PrivLeak compares that AUC with the retrained model's.

Sources of the formulas (facts, not code): LOSS (Yeom et al. 2018); zlib and lowercase ratios (Carlini et
al. 2021, "Extracting Training Data from Large Language Models"); Min-K% Prob (Shi et al. 2024); Min-K%++
(Zhang et al. 2024); PrivLeak and the Min-40% default (Shi et al. 2024, MUSE).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from relapse.metrics.scoring import TokenScores

#: MUSE's published AUCs of its retrained models under Min-40%, for users without a retrained model.
MUSE_RETRAINED_AUC = {"news": 0.4772, "books": 0.5393}

#: The Min-K% share PrivLeak uses (MUSE).
PRIVLEAK_K = 0.4


def _lowest_mean(values: np.ndarray, k: float) -> float:
    """Mean of the lowest ``floor(len * k)`` values (at least one, so short texts still score)."""
    if values.size == 0:
        return float("nan")
    count = max(1, int(values.size * k))
    return float(np.sort(values)[:count].mean())


def loss_membership(scores: TokenScores) -> float:
    """Mean token log-probability (minus the LOSS attack's loss)."""
    return float(scores.logprobs.mean()) if scores.n_tokens else float("nan")


def zlib_membership(scores: TokenScores, text: str) -> float:
    """Mean token log-probability divided by the zlib-compressed length of the text in bytes.

    Text that is easy to compress (repetitive) is easy to predict without having been seen; dividing by
    its compressed size discounts that.
    """
    return loss_membership(scores) / len(zlib.compress(text.encode("utf-8")))


def lowercase_membership(scores: TokenScores, lowercase_scores: TokenScores) -> float:
    """Mean NLL of the lowercased text over the mean NLL of the text as written.

    A memorised text is much more likely in its exact casing than lowercased.
    """
    return lowercase_scores.nll / scores.nll


def min_k_membership(scores: TokenScores, k: float) -> float:
    """Mean of the lowest ``k`` share of token log-probabilities (Min-K% Prob, ``k`` in (0, 1])."""
    return _lowest_mean(scores.logprobs, k)


def min_k_plus_plus_membership(scores: TokenScores, k: float) -> float:
    """Min-K%++: the same over log-probabilities standardised by the model's own next-token distribution.

    Each token's log-probability minus the expected log-probability of the next token, divided by its
    standard deviation, both under the model's predicted distribution at that position.
    """
    std = np.where(scores.std_logprob > 0, scores.std_logprob, np.finfo(np.float64).tiny)
    return _lowest_mean((scores.logprobs - scores.mean_logprob) / std, k)


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive), ties counted as half.

    This is the Mann-Whitney U statistic over the number of pairs; it equals the trapezoidal area under
    sklearn's ``roc_curve`` (a test checks this on tied and untied scores).
    """
    labels_array = np.asarray(labels, dtype=np.int64)
    scores_array = np.asarray(scores, dtype=np.float64)
    positives = int((labels_array == 1).sum())
    negatives = int((labels_array == 0).sum())
    if positives == 0 or negatives == 0 or positives + negatives != labels_array.size:
        raise ValueError("roc_auc needs labels of 0 and 1 with at least one of each")
    if np.isnan(scores_array).any():
        raise ValueError("roc_auc got NaN scores")
    order = np.argsort(scores_array, kind="mergesort")
    sorted_scores = scores_array[order]
    ranks = np.empty(scores_array.size, dtype=np.float64)
    start = 0
    while start < sorted_scores.size:
        end = start
        while end + 1 < sorted_scores.size and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    rank_sum = ranks[labels_array == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def membership_auc(forget_membership: Sequence[float], holdout_membership: Sequence[float]) -> float:
    """MUSE's AUC: forget texts are label 0, holdout texts label 1, scored by membership."""
    labels = [0] * len(forget_membership) + [1] * len(holdout_membership)
    return roc_auc(labels, list(forget_membership) + list(holdout_membership))


def privleak(auc: float, retrained_auc: float) -> float:
    """PrivLeak in percent: ``(AUC - AUC_retrained) / AUC_retrained x 100``; near 0 is good."""
    if not retrained_auc > 0:
        raise ValueError(f"the retrained model's AUC must be positive, got {retrained_auc}")
    return (auc - retrained_auc) / retrained_auc * 100.0
