"""The unlearning losses, each checked against an independent computation on small hand-made logits.

References are written out with plain Python floats and ``math`` (explicit loops over positions), or
with ``torch.nn.functional`` primitives the losses do not use; no loss is checked against itself.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from relapse.errors import ConfigError
from relapse.methods import losses
from relapse.methods.registry import method_names, parse_method

IGNORE = -100
B, T, V = 3, 5, 6


def _logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=generator, dtype=torch.float64) * scale


def _labels(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[0, 2] = IGNORE  # a hole in the middle
    labels[1, 0] = IGNORE  # position 0 is never predicted anyway
    labels[2, 3:] = IGNORE  # right padding
    return labels


def _log_softmax_at(row: list[float], v: int) -> float:
    return math.log(math.exp(row[v]) / sum(math.exp(x) for x in row))


def _softmax(row: list[float]) -> list[float]:
    total = sum(math.exp(x) for x in row)
    return [math.exp(x) / total for x in row]


def _hand_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> list[list[float | None]]:
    """``[B][T-1]``: log p(label[t+1] | logits[t]), ``None`` where the label is ignored."""
    rows, labs = logits.tolist(), labels.tolist()
    out = []
    for b in range(len(rows)):
        seq = []
        for t in range(len(rows[b]) - 1):
            label = labs[b][t + 1]
            seq.append(None if label == IGNORE else _log_softmax_at(rows[b][t], label))
        out.append(seq)
    return out


def _f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _log_sigmoid(x: float) -> float:
    return math.log(1.0 / (1.0 + math.exp(-x)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- token log-probs, sequence log-likelihood, cross-entropy ---------------------------------------------


def test_token_logprobs_match_explicit_loop_with_shift_and_ignored_labels():
    logits, labels = _logits(1), _labels()
    picked, mask = losses.token_logprobs(logits, labels)
    expected = _hand_token_logprobs(logits, labels)
    assert picked.shape == mask.shape == (B, T - 1)
    for b in range(B):
        for t in range(T - 1):
            if expected[b][t] is None:
                assert not bool(mask[b, t])
                assert float(picked[b, t]) == 0.0
            else:
                assert bool(mask[b, t])
                assert float(picked[b, t]) == pytest.approx(expected[b][t], abs=1e-5)
    # Ignored labels: (0, 2) -> shifted (0, 1); padding of row 2 -> shifted (2, 2) and (2, 3).
    assert mask.tolist()[0] == [True, False, True, True]
    assert mask.tolist()[2] == [True, True, False, False]


def test_logits_at_t_predict_label_t_plus_1():
    labels = torch.tensor([[1, 4, 0, 2, 3], [5, 5, 1, 0, IGNORE]])
    shifted = torch.full((2, T, V), -20.0, dtype=torch.float64)
    unshifted = shifted.clone()
    for b in range(2):
        for t in range(T):
            if t + 1 < T and labels[b, t + 1] != IGNORE:
                shifted[b, t, labels[b, t + 1]] = 20.0
            if labels[b, t] != IGNORE:
                unshifted[b, t, labels[b, t]] = 20.0
    # Logits that put all mass on the *next* label: likelihood 1, NLL 0.
    assert losses.sequence_logprob(shifted, labels).abs().max() < 1e-6
    assert float(losses.mean_token_nll(shifted, labels)) < 1e-6
    # Logits that put all mass on the *current* label are badly wrong under the next-token convention.
    assert float(losses.mean_token_nll(unshifted, labels)) > 30.0


def test_sequence_logprob_sums_counted_tokens_of_each_sequence():
    logits, labels = _logits(2), _labels()
    expected = [sum(x for x in seq if x is not None) for seq in _hand_token_logprobs(logits, labels)]
    got = losses.sequence_logprob(logits, labels)
    assert got.shape == (B,)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_sequence_logprob_of_fully_ignored_sequence_is_zero():
    logits, labels = _logits(3), _labels()
    labels[1] = IGNORE
    got = losses.sequence_logprob(logits, labels)
    assert float(got[1]) == 0.0
    assert float(got[0]) < -0.1


def test_mean_token_nll_matches_loop_and_cross_entropy():
    logits, labels = _logits(4), _labels()
    values = [x for seq in _hand_token_logprobs(logits, labels) for x in seq if x is not None]
    by_hand = -sum(values) / len(values)
    reference = F.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    ).item()
    got = float(losses.mean_token_nll(logits, labels))
    assert by_hand == pytest.approx(reference, abs=1e-12)
    assert got == pytest.approx(reference, abs=1e-5)


def test_ga_and_gdr_are_minus_and_plus_cross_entropy():
    logits, labels = _logits(5), _labels(1)
    reference = F.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    ).item()
    assert reference > 0.1
    assert float(losses.ga_loss(logits, labels)) == pytest.approx(-reference, abs=1e-5)
    assert float(losses.gdr_loss(logits, labels)) == pytest.approx(reference, abs=1e-5)


def test_ga_gradient_raises_the_cross_entropy():
    logits, labels = _logits(6), _labels()
    logits = logits.clone().requires_grad_(True)
    losses.ga_loss(logits, labels).backward()
    with torch.no_grad():
        stepped = logits - 0.1 * logits.grad
        flat_labels = labels[:, 1:].reshape(-1)
        before = F.cross_entropy(logits[:, :-1].reshape(-1, V), flat_labels, ignore_index=IGNORE)
        after = F.cross_entropy(stepped[:, :-1].reshape(-1, V), flat_labels, ignore_index=IGNORE)
    assert float(after) > float(before) + 1e-3


# --- NPO ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_npo_matches_hand_formula(beta):
    lp = [-12.0, -3.5, -40.25]
    lp_ref = [-10.0, -7.0, -41.0]
    by_hand = -(2.0 / beta) * sum(_log_sigmoid(-beta * (a - r)) for a, r in zip(lp, lp_ref, strict=True)) / 3
    got = losses.npo_loss(_f64(lp), _f64(lp_ref), beta)
    assert float(got) == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_at_the_reference_is_two_log_two_over_beta(beta):
    lp = torch.tensor([-5.0, -17.0, -0.3], dtype=torch.float64)
    got = losses.npo_loss(lp, lp.clone(), beta)
    assert float(got) == pytest.approx(2 * math.log(2) / beta, rel=1e-12)


def test_npo_decreases_as_forget_likelihood_drops_below_reference():
    ref = torch.tensor([-10.0, -20.0], dtype=torch.float64)
    values = [float(losses.npo_loss(ref - drop, ref)) for drop in (0.0, 1.0, 5.0, 20.0, 100.0, 400.0)]
    assert all(a > b for a, b in itertools.pairwise(values))
    assert values[-1] < 1e-3  # towards 0 as the sequences become much less likely


def test_npo_gradient_is_positive_and_matches_analytic_derivative():
    # L = -(2/(beta*B)) sum_i logsigmoid(-beta r_i), r_i = lp_i - ref_i;
    # d/dx logsigmoid(x) = sigmoid(-x), so dL/dlp_i = -(2/(beta*B)) * sigmoid(beta r_i) * (-beta)
    #                                              = (2/B) * sigmoid(beta r_i) > 0.
    beta = 0.1
    lp_list, ref_list = [-12.0, -3.5, -40.25, -8.0], [-10.0, -7.0, -41.0, -8.0]
    lp = torch.tensor(lp_list, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor(ref_list, dtype=torch.float64)
    losses.npo_loss(lp, ref, beta).backward()
    n = len(lp_list)
    analytic = [(2.0 / n) * _sigmoid(beta * (a - r)) for a, r in zip(lp_list, ref_list, strict=True)]
    assert (lp.grad > 0).all()
    assert lp.grad.tolist() == pytest.approx(analytic, rel=1e-12)
    # Finite differences too, and torch's own check of the backward pass.
    eps = 1e-6
    for i in range(n):
        up, down = list(lp_list), list(lp_list)
        up[i] += eps
        down[i] -= eps
        numeric = (
            float(losses.npo_loss(torch.tensor(up, dtype=torch.float64), ref, beta))
            - float(losses.npo_loss(torch.tensor(down, dtype=torch.float64), ref, beta))
        ) / (2 * eps)
        assert numeric == pytest.approx(analytic[i], rel=1e-6)
    assert torch.autograd.gradcheck(lambda x: losses.npo_loss(x, ref, beta), (lp.detach().requires_grad_(),))


def test_npo_gradient_descent_lowers_the_forget_likelihood():
    logits, labels = _logits(7), _labels()
    ref_lp = losses.sequence_logprob(logits, labels).detach()
    current = logits.clone().requires_grad_(True)
    losses.npo_loss(losses.sequence_logprob(current, labels), ref_lp).backward()
    with torch.no_grad():
        stepped = current - 1.0 * current.grad
    hand_before = [sum(x for x in s if x is not None) for s in _hand_token_logprobs(logits, labels)]
    hand_after = [sum(x for x in s if x is not None) for s in _hand_token_logprobs(stepped, labels)]
    assert all(a < b for a, b in zip(hand_after, hand_before, strict=True))


# --- KLR ------------------------------------------------------------------------------------------------


def test_klr_is_zero_against_itself_and_positive_otherwise():
    logits, labels = _logits(8), _labels()
    assert abs(float(losses.klr_loss(logits, losses.reference_log_probs(logits.clone()), labels))) < 1e-6
    other = _logits(9)
    assert float(losses.klr_loss(logits, losses.reference_log_probs(other), labels)) > 0.01


def test_klr_matches_explicit_double_loop():
    logits, ref_logits, labels = _logits(10), _logits(11), _labels()
    rows, ref_rows, labs = logits.tolist(), ref_logits.tolist(), labels.tolist()
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T - 1):
            if labs[b][t + 1] == IGNORE:
                continue
            p_ref, p = _softmax(ref_rows[b][t]), _softmax(rows[b][t])
            total += sum(p_ref[v] * (math.log(p_ref[v]) - math.log(p[v])) for v in range(V))
            count += 1
    assert count == B * (T - 1) - 3
    got = float(losses.klr_loss(logits, losses.reference_log_probs(ref_logits), labels))
    assert got == pytest.approx(total / count, rel=1e-5)


def test_klr_matches_torch_kl_div_on_counted_positions():
    logits, ref_logits, labels = _logits(12), _logits(13), _labels()
    counted = labels[:, 1:] != IGNORE
    log_p = torch.log_softmax(logits[:, :-1], dim=-1)[counted]
    log_p_ref = torch.log_softmax(ref_logits[:, :-1], dim=-1)[counted]
    reference = F.kl_div(log_p, log_p_ref, log_target=True, reduction="sum") / counted.sum()
    got = losses.klr_loss(logits, losses.reference_log_probs(ref_logits), labels)
    assert float(got) == pytest.approx(float(reference), rel=1e-5)


def test_klr_ignores_uncounted_positions():
    logits, ref_logits, labels = _logits(14), _logits(15), _labels()
    base = float(losses.klr_loss(logits, losses.reference_log_probs(ref_logits), labels))
    changed = logits.clone()
    changed[0, 1] += torch.arange(V, dtype=torch.float64) * 3  # predicts the ignored label (0, 2)
    changed[2, 3] -= torch.arange(V, dtype=torch.float64) * 3  # predicts padding (2, 4)
    changed[:, -1] += torch.arange(V, dtype=torch.float64) * 3  # the last position predicts nothing
    again = float(losses.klr_loss(changed, losses.reference_log_probs(ref_logits), labels))
    assert again == pytest.approx(base, abs=1e-6)
    changed[1, 1] += torch.arange(V, dtype=torch.float64) * 3  # a counted position does matter
    assert float(losses.klr_loss(changed, losses.reference_log_probs(ref_logits), labels)) > base + 0.01


def test_klr_is_invariant_to_a_constant_added_to_the_logits_at_a_position():
    logits, ref_logits, labels = _logits(16), _logits(17), _labels()
    generator = torch.Generator().manual_seed(18)
    shift = torch.randn(B, T, 1, generator=generator, dtype=torch.float64) * 10
    base = float(losses.klr_loss(logits, losses.reference_log_probs(ref_logits), labels))
    assert float(losses.klr_loss(logits + shift, losses.reference_log_probs(ref_logits), labels)) == (
        pytest.approx(base, abs=1e-5)
    )
    assert float(losses.klr_loss(logits, losses.reference_log_probs(ref_logits + shift), labels)) == (
        pytest.approx(base, abs=1e-5)
    )


# --- muse-compatible variants: reproducible on purpose, and documented as traps ---------------------------


def test_kl_on_logits_matches_its_formula_and_is_not_a_divergence():
    logits, ref_logits = _logits(19), _logits(20)
    # F.kl_div(input, target, log_target=True, reduction="batchmean") = sum exp(target)*(target-input) / B
    flat_l, flat_r = logits.reshape(-1).tolist(), ref_logits.reshape(-1).tolist()
    by_hand = sum(math.exp(r) * (r - x) for x, r in zip(flat_l, flat_r, strict=True)) / B
    assert float(losses.kl_on_logits(logits, ref_logits)) == pytest.approx(by_hand, rel=1e-5)
    # Same next-token distributions, shifted logits: a real KL is 0, this one is not (and is negative).
    mass = sum(math.exp(r) for r in flat_r)
    shifted = float(losses.kl_on_logits(ref_logits + 1.0, ref_logits))
    assert shifted == pytest.approx(-mass / B, rel=1e-5)
    assert shifted < -1.0
    same_dist = losses.klr_loss(ref_logits + 1.0, losses.reference_log_probs(ref_logits), _labels())
    assert abs(float(same_dist)) < 1e-6


def test_kl_on_logits_can_be_negative():
    ref_logits = torch.zeros(1, 2, 3, dtype=torch.float64)
    logits = torch.full((1, 2, 3), 3.0, dtype=torch.float64)
    # exp(0) * (0 - 3) for 6 entries, batchmean over 1 sequence: -18.
    assert float(losses.kl_on_logits(logits, ref_logits)) == pytest.approx(-18.0, rel=1e-6)


def test_kl_on_logits_is_not_invariant_to_a_constant_shift():
    logits, ref_logits = _logits(21), _logits(22)
    base = float(losses.kl_on_logits(logits, ref_logits))
    assert abs(float(losses.kl_on_logits(logits + 2.0, ref_logits)) - base) > 1.0


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_on_logits_matches_its_element_wise_formula(beta):
    logits, ref_logits = _logits(23), _logits(24)
    flat_l, flat_r = logits.reshape(-1).tolist(), ref_logits.reshape(-1).tolist()
    terms = [_log_sigmoid(beta * (r - x)) for x, r in zip(flat_l, flat_r, strict=True)]
    by_hand = -(2.0 / beta) * sum(terms) / len(terms)
    assert float(losses.npo_on_logits(logits, ref_logits, beta)) == pytest.approx(by_hand, rel=1e-5)


def test_npo_on_logits_is_not_invariant_to_a_constant_shift_unlike_npo():
    ref_logits, labels = _logits(25), _labels()
    shifted = ref_logits + 5.0  # identical next-token distributions
    at_start = 2 * math.log(2) / 0.1
    assert float(losses.npo_on_logits(ref_logits, ref_logits)) == pytest.approx(at_start, rel=1e-6)
    assert abs(float(losses.npo_on_logits(shifted, ref_logits)) - at_start) > 1.0
    # The published loss depends on likelihoods only, so the shift changes nothing.
    ref_lp = losses.sequence_logprob(ref_logits, labels)
    npo = losses.npo_loss(losses.sequence_logprob(shifted, labels), ref_lp)
    assert float(npo) == pytest.approx(at_start, rel=1e-5)


# --- registry -------------------------------------------------------------------------------------------

SIX = {
    "ga": ("ga", None),
    "ga+gdr": ("ga", "gdr"),
    "ga+klr": ("ga", "klr"),
    "npo": ("npo", None),
    "npo+gdr": ("npo", "gdr"),
    "npo+klr": ("npo", "klr"),
}


@pytest.mark.parametrize("name", sorted(SIX))
def test_parse_method_six_baselines(name):
    spec = parse_method(name)
    assert (spec.forget, spec.regularizer) == SIX[name]
    assert spec.name == name
    forget, regularizer = SIX[name]
    assert spec.needs_reference == (forget == "npo" or regularizer == "klr")
    assert spec.needs_retain == (regularizer is not None)


def test_needs_flags_explicitly():
    assert [parse_method(n).needs_reference for n in ("ga", "ga+gdr", "ga+klr")] == [False, False, True]
    assert [parse_method(n).needs_reference for n in ("npo", "npo+gdr", "npo+klr")] == [True, True, True]
    assert [parse_method(n).needs_retain for n in ("ga", "npo", "ga+gdr", "npo+klr")] == [
        False,
        False,
        True,
        True,
    ]


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("NPO_GDR", "npo+gdr"),
        ("GA_KLR", "ga+klr"),
        (" Npo+Klr ", "npo+klr"),
        ("GA", "ga"),
        ("ga_gdr", "ga+gdr"),
        ("NPO", "npo"),
    ],
)
def test_parse_method_accepts_paper_spellings(spelling, canonical):
    assert parse_method(spelling) == parse_method(canonical)
    assert parse_method(spelling).name == canonical


def test_method_names_are_the_six_baselines_and_the_added_methods():
    added = {"simnpo", "simnpo+gdr", "simnpo+klr", "simnpo+act", "rmu", "rmu+gdr", "rmu+klr"}
    added |= {"ga+act", "npo+act"}
    assert sorted(method_names()) == sorted(set(SIX) | added)


def test_a_forget_term_implies_its_own_regularizer():
    spec = parse_method("rmu")
    assert (spec.forget, spec.regularizer, spec.name) == ("rmu", "act", "rmu")
    assert parse_method("rmu+act") == spec
    assert parse_method("rmu+gdr").name == "rmu+gdr"
    assert spec.needs_reference and spec.needs_retain
    assert not parse_method("simnpo").needs_reference  # SimNPO is reference-free


@pytest.mark.parametrize(
    "name", ["", "sure", "gdr", "klr", "ga+", "+gdr", "ga+npo", "ga+gdr+klr", "npo+sure", "klr+ga", "gdr_ga"]
)
def test_parse_method_rejects_unknown_names(name):
    with pytest.raises(ConfigError, match="unknown method"):
        parse_method(name)
