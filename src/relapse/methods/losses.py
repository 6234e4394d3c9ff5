"""Unlearning losses as pure functions of logits, labels and reference values.

Conventions: ``labels`` are the input ids with ``-100`` wherever a token does not count (padding, and
the prompt when only answer tokens count); position ``t`` of the logits predicts label ``t + 1``, as in
Hugging Face causal LMs. Every loss here is *minimised* by the training loop.

Definitions (docs/cli.md lists them per method):

- GA: ``-CE(forget)``, the mean token cross-entropy with its sign flipped.
- NPO (Zhang et al. 2024, arXiv 2404.05868): ``-(2/beta) * mean_i logsigmoid(-beta * (log p_theta(y_i) -
  log p_ref(y_i)))`` where ``log p(y_i)`` is the *summed* log-likelihood of sequence ``i``'s counted
  tokens.
- SimNPO (Fan et al. 2024, arXiv 2410.07163): ``-(2/beta) * mean_i logsigmoid(-(beta/|y_i|) * log
  p_theta(y_i) - gamma)``: NPO without a reference model, on the length-normalised log-likelihood, with a
  margin ``gamma``.
- RMU (Li et al. 2024, WMDP, arXiv 2403.03218): ``mean ||h_l(x) - c*u||^2`` over forget tokens (the
  hidden state at layer ``l`` steered to a fixed random unit vector ``u`` scaled by ``c``), and ``mean
  ||h_l(x) - h_l^start(x)||^2`` over retain tokens; both squared norms divided by the hidden size, as
  ``mse_loss`` averages them.
- GDR: ``CE(retain)``.
- KLR: ``KL(p_ref || p_theta)`` of the next-token distributions, averaged over counted retain positions.

The ``*_on_logits`` functions reproduce formulas found in public reference code, which are *not* the
published losses (NPO applied element-wise to raw logits, "KL" of raw logits treated as log-probs). They
exist only so that numbers from that code can be reproduced on purpose, under the explicit
``muse-compatible`` option; relapse never uses them by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align logits with the labels they predict: ``(logits[:, :-1], labels[:, 1:])``."""
    return logits[:, :-1, :], labels[:, 1:]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next label, and the mask of positions that count (both ``[B, T-1]``)."""
    shifted_logits, shifted_labels = shift_for_next_token(logits, labels)
    mask = shifted_labels != IGNORE_INDEX
    log_probs = torch.log_softmax(shifted_logits.float(), dim=-1)
    picked = log_probs.gather(-1, shifted_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-likelihood of each sequence's counted tokens, shape ``[B]``."""
    picked, _ = token_logprobs(logits, labels)
    return picked.sum(dim=-1)


def mean_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over every counted token of the batch (what HF's ``.loss`` reports)."""
    picked, mask = token_logprobs(logits, labels)
    return -picked.sum() / mask.sum().clamp(min=1)


def ga_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget batch: minimise ``-CE``."""
    return -mean_token_nll(logits, labels)


def gdr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient-descent regulariser on the retain batch: ``CE``."""
    return mean_token_nll(logits, labels)


def npo_loss(seq_logp: torch.Tensor, ref_seq_logp: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """NPO on sequence log-likelihoods (``[B]`` each) of the current and the reference model.

    Equals 2 log 2 / beta when the model still equals the reference, falls towards 0 as the forget
    sequences become less likely than under the reference, and its gradient pushes ``seq_logp`` down.
    """
    log_ratio = seq_logp - ref_seq_logp.to(seq_logp.dtype)
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def simnpo_loss(
    seq_logp: torch.Tensor, lengths: torch.Tensor, beta: float = 2.5, gamma: float = 0.0
) -> torch.Tensor:
    """SimNPO on summed sequence log-likelihoods ``[B]`` and counted-token counts ``[B]``.

    With ``n_i`` the mean token NLL of sequence ``i`` it is ``(2/beta) * mean_i log(1 + exp(gamma - beta *
    n_i))``: no reference model is needed, long and short answers weigh alike, and it falls towards 0 as
    ``n_i`` grows past ``gamma / beta``.
    """
    mean_logp = seq_logp / lengths.to(seq_logp.dtype).clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(-beta * mean_logp - gamma).mean()


def activation_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over counted positions of ``||hidden - target||^2 / hidden_size``.

    Args:
        hidden: ``[B, T, H]`` hidden states.
        target: ``[H]`` (a steering vector) or ``[B, T, H]`` (reference hidden states).
        mask: ``[B, T]``, true where a position counts.
    """
    per_position = (hidden.float() - target.float()).pow(2).mean(dim=-1)
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp(min=1)


def klr_loss(logits: torch.Tensor, ref_log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p_theta)`` of next-token distributions, averaged over counted positions.

    Args:
        logits: current model's logits ``[B, T, V]``.
        ref_log_probs: the reference model's log-softmax at the *shifted* positions ``[B, T-1, V]``.
        labels: ``[B, T]`` with ``-100`` on positions that do not count.
    """
    shifted_logits, shifted_labels = shift_for_next_token(logits, labels)
    mask = (shifted_labels != IGNORE_INDEX).float()
    log_p = torch.log_softmax(shifted_logits.float(), dim=-1)
    ref = ref_log_probs.float()
    per_position = (ref.exp() * (ref - log_p)).sum(dim=-1)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def reference_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """The reference model's log-softmax at shifted positions, as :func:`klr_loss` expects."""
    return torch.log_softmax(logits[:, :-1, :].float(), dim=-1)


def npo_on_logits(logits: torch.Tensor, ref_logits: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """``muse-compatible`` NPO: the NPO formula applied element-wise to raw logits (not a likelihood ratio).

    Reproduces reference code that computes ``ref_logits - logits`` per vocabulary entry; kept only for
    reproducing such numbers.
    """
    return -(2.0 / beta) * F.logsigmoid(beta * (ref_logits.float() - logits.float())).mean()


def kl_on_logits(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``muse-compatible`` "KL": ``F.kl_div`` fed raw logits as if they were log-probabilities.

    Not a divergence between distributions (it can be negative); kept only for reproducing such numbers.
    """
    return F.kl_div(logits.float(), ref_logits.float(), reduction="batchmean", log_target=True)
