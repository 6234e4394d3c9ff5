"""Bootstrap confidence intervals over items (questions, passages), paired across models.

A metric that is a mean over items (KnowMem and VerbMem ROUGE, QA recall, answer NLL) carries its
per-item values (``item_values``), so its uncertainty can be estimated from the items themselves: draw
``n`` items with replacement ``replicates`` times, recompute the statistic on each draw, and take the
central ``level`` share of the replicates (the percentile interval; Efron & Tibshirani, *An
Introduction to the Bootstrap*, 1993, ch. 13).

A recovered share compares several models on the same items, so the draws are *paired*: one set of drawn
indices serves every model in a replicate, and what the models have in common (an item every model
finds hard) cancels instead of adding noise. A replicate whose gap is too small to divide by gives no
share; when more than ``MAX_UNDEFINED`` of them do, there is no interval.

Everything is seeded: the same inputs and seed give the same interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

#: Bootstrap replicates: the percentile interval's ends move by about 0.01 of its width between seeds.
REPLICATES = 2000
#: The interval's coverage.
LEVEL = 0.95
#: The largest share of replicates that may have no defined statistic before the interval is withheld.
MAX_UNDEFINED = 0.05


def draws(n_items: int, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """``replicates x n_items`` item indices drawn with replacement (the same for every model)."""
    return np.random.default_rng(seed).integers(0, n_items, size=(replicates, n_items))


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """The central ``level`` share of the finite ``values``, or None when too many are undefined."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.size < (1 - MAX_UNDEFINED) * values.size:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(
    item_values: Sequence[float], replicates: int = REPLICATES, seed: int = 0, level: float = LEVEL
) -> tuple[float, float] | None:
    """The bootstrap interval of the mean of ``item_values``."""
    values = np.asarray(item_values, dtype=float)
    if values.size == 0:
        return None
    means = values[draws(values.size, replicates, seed)].mean(axis=1)
    return percentile_interval(means, level)


def paired_replicates(
    statistic: Callable[..., np.ndarray],
    item_values: Sequence[Sequence[float]],
    replicates: int = REPLICATES,
    seed: int = 0,
) -> np.ndarray:
    """``statistic(mean_1, ..., mean_k)`` on every replicate, each mean over the same drawn items.

    ``item_values`` holds one list per model, all over the same items in the same order; ``statistic``
    takes arrays of replicate means and returns an array (NaN where it is undefined).
    """
    arrays = [np.asarray(values, dtype=float) for values in item_values]
    sizes = {array.size for array in arrays}
    if len(sizes) != 1:
        raise ValueError(f"paired values need the same items for every model, got sizes {sorted(sizes)}")
    index = draws(sizes.pop(), replicates, seed)
    return statistic(*(array[index].mean(axis=1) for array in arrays))


def auc_interval(
    forget: Sequence[float],
    holdout: Sequence[float],
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    replicates: int = REPLICATES,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float] | None:
    """The bootstrap interval of a membership AUC (holdout scored above forget; ties count a half, as
    :func:`relapse.metrics.mia.membership_auc`), the two sets resampled separately, or of
    ``transform(auc)`` (PrivLeak's percentage of the retrained AUC).

    Every replicate's AUC is a weighted mean of one pairwise comparison matrix (a drawn item counts as
    often as it was drawn), so the replicates cost one matrix product instead of a sort each.
    """
    forget_scores, holdout_scores = np.asarray(forget, dtype=float), np.asarray(holdout, dtype=float)
    if forget_scores.size == 0 or holdout_scores.size == 0:
        return None
    wins = (holdout_scores[None, :] > forget_scores[:, None]) + 0.5 * (
        holdout_scores[None, :] == forget_scores[:, None]
    )
    counts_f = _counts(draws(forget_scores.size, replicates, seed), forget_scores.size)
    counts_h = _counts(draws(holdout_scores.size, replicates, seed + 1), holdout_scores.size)
    aucs = ((counts_f @ wins) * counts_h).sum(axis=1) / (forget_scores.size * holdout_scores.size)
    return percentile_interval(transform(aucs) if transform is not None else aucs, level)


def perplexity_interval(
    token_counts: Sequence[int],
    nll_sums: Sequence[float],
    replicates: int = REPLICATES,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float] | None:
    """The bootstrap interval of a corpus perplexity, ``exp(sum of NLL / sum of tokens)``, texts resampled
    (each text's token count and summed NLL together)."""
    tokens, sums = np.asarray(token_counts, dtype=float), np.asarray(nll_sums, dtype=float)
    if tokens.size == 0:
        return None
    counts = _counts(draws(tokens.size, replicates, seed), tokens.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        return percentile_interval(np.exp((counts @ sums) / (counts @ tokens)), level)


def _counts(index: np.ndarray, size: int) -> np.ndarray:
    """How often each item was drawn in each replicate (``replicates x size``)."""
    counts = np.zeros((index.shape[0], size))
    np.add.at(counts, (np.arange(index.shape[0])[:, None], index), 1.0)
    return counts


def items_needed(n_items: int, half_width: float, wanted_half_width: float) -> int | None:
    """About how many items would shrink an interval's half width from ``half_width`` to
    ``wanted_half_width`` (a mean's interval narrows as one over the square root of the item count);
    None when no count would (nothing to shrink to)."""
    if wanted_half_width <= 0 or half_width <= 0:
        return None
    return int(np.ceil(n_items * (half_width / wanted_half_width) ** 2))
