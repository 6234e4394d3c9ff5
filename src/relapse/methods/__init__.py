"""Methods: the shared training loop (and, in later issues, the unlearning losses and SURE)."""

from relapse.methods.loop import LoopConfig, LoopResult, lr_at, run_loop

__all__ = ["LoopConfig", "LoopResult", "lr_at", "run_loop"]
