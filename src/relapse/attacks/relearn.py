"""Relearning attacks: a few fine-tuning steps on data other than the forget set, then re-measure.

``relearn-<split>-<steps>[-lr<rate>]`` fine-tunes on QA pairs of ``split``:

- ``retain``: the retain set's QA pairs (the cheapest, most innocent-looking fine-tune);
- ``holdout``: QA pairs about people never trained on (needs ``holdout_qa.jsonl``);
- ``forget-half``: the even-numbered forget QA pairs; the odd-numbered ones are the ones to measure
  (their indices are returned), so that recovery means knowledge that was never re-taught.

If forgotten facts come back after training on other data, the knowledge was hidden, not removed. Run the
retrained model under the same attack as the control that separates "came back" from "was taught".
"""

from __future__ import annotations

from typing import Any

import torch

from relapse.attacks.base import MEASURED_FORGET_QA, Attack, AttackContext
from relapse.data.batching import EpochSampler, collate, tokenize_for_lm
from relapse.data.benchmark import forget_half
from relapse.data.prompts import qa_text
from relapse.errors import ConfigError
from relapse.training.loop import LoopConfig, run_loop

RELEARN_SPLITS = ("retain", "holdout", "forget-half")
DEFAULT_RELEARN_LR = 1e-4
RELEARN_BATCH_SIZE = 16


class RelearnAttack(Attack):
    kind = "relearning"

    def __init__(self, split: str, steps: int, lr: float = DEFAULT_RELEARN_LR) -> None:
        if split not in RELEARN_SPLITS:
            raise ConfigError(f"relearning split must be one of {', '.join(RELEARN_SPLITS)}, got {split!r}")
        if steps < 1 or lr <= 0:
            raise ConfigError("relearning needs at least one step and a positive learning rate")
        self.split, self.steps, self.lr = split, steps, lr
        suffix = "" if lr == DEFAULT_RELEARN_LR else f"-lr{lr:.12g}"
        self.name = f"relearn-{split}-{steps}{suffix}"

    def touched(self, model, context):
        return dict(model.named_parameters())

    def apply(self, model: torch.nn.Module, context: AttackContext) -> dict[str, Any]:
        benchmark = context.require_benchmark(self.name)
        measured: list[int] = []
        if self.split == "retain":
            pairs = benchmark.retain_qa
        elif self.split == "holdout":
            pairs = benchmark.holdout_qa
        else:
            taught, measured = forget_half(len(benchmark.forget_qa))
            pairs = [benchmark.forget_qa[i] for i in taught]
        if not pairs:
            raise ConfigError(f"{self.name}: the benchmark has no {self.split} QA pairs to train on")
        tokenizer = context.tokenizer
        examples = tokenize_for_lm(tokenizer, [qa_text(p) for p in pairs], 256)
        sampler = EpochSampler(len(examples), RELEARN_BATCH_SIZE, context.seed)
        trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            result = run_loop(
                model,
                LoopConfig(
                    lr=self.lr, max_steps=self.steps, batch_size=RELEARN_BATCH_SIZE, seed=context.seed
                ),
                lambda step, micro: collate(
                    [examples[i] for i in sampler.indices(step)], tokenizer.pad_token_id
                ),
                lambda m, batch: (m(**batch).loss, {}),
                run_key=self.name,
                progress=context.progress,
                description=self.name,
            )
        finally:
            for name, p in model.named_parameters():
                p.requires_grad_(trainable[name])
                p.grad = None  # no stale relearning gradients left on the restored model
        return {
            "split": self.split,
            "steps": self.steps,
            "lr": self.lr,
            "trained_pairs": len(pairs),
            MEASURED_FORGET_QA: measured,
            "loss_curve": result.loss_curve,
        }
