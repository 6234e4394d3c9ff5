"""SimNPO (Fan et al. 2024, arXiv 2410.07163): NPO without a reference model.

NPO compares each forget sequence's likelihood with the starting model's; SimNPO drops the reference and
uses the length-normalised log-likelihood with a margin ``gamma``, which weighs short and long forget
examples alike. Its temperature is ``--simnpo-beta`` (larger than NPO's, because a mean token
log-likelihood is much smaller than a summed one).
"""

from __future__ import annotations

import torch

from relapse.methods import losses
from relapse.methods.component import Batch, ForgetTerm


class SimNPO(ForgetTerm):
    name = "simnpo"
    summary = "SimNPO: reference-free, length-normalised NPO with a margin (--simnpo-beta, --simnpo-gamma)"

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        picked, mask = losses.token_logprobs(self.context.logits(model, batch), batch["labels"])
        return losses.simnpo_loss(
            picked.sum(dim=-1), mask.sum(dim=-1), self.config.simnpo_beta, self.config.simnpo_gamma
        )
