"""relapse: LLM unlearning that does not fool itself.

Unlearn a Hugging Face causal LM, attack the result with the cheap transformations that bring knowledge
back (quantization first), measure forgetting, utility and recovery side by side, and report whether the
forgetting is real.
"""

__version__ = "0.1.0"
