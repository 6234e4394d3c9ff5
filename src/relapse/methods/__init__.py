"""Methods: the shared training loop, the unlearning terms (one module each, named in ``registry``),
SURE's mask, SAM, the quantization-robust objective and utility-preserving selection."""

from relapse.methods.loop import LoopConfig, LoopResult, lr_at, run_loop

__all__ = ["LoopConfig", "LoopResult", "lr_at", "run_loop"]
