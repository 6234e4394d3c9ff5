"""Training: the one optimisation loop, its data-parallel plumbing, and fine-tuning a model on a benchmark.

Methods (unlearning), attacks (relearning) and fine-tuning all run through :func:`run_loop`; this package
stands on ``data`` and ``models`` and imports nothing from the methods, attacks, audit or report above it.
"""

from relapse.training.loop import LoopConfig, LoopResult, lr_at, run_loop

__all__ = ["LoopConfig", "LoopResult", "lr_at", "run_loop"]
