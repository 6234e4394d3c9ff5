"""Models: safe loading and saving of Hugging Face causal LMs, and tiny Llamas built offline."""

from relapse.models.io import load_model, save_model
from relapse.models.tiny import TinyConfig, build_tiny
from relapse.models.tokenizer import build_tokenizer

__all__ = ["TinyConfig", "build_tiny", "build_tokenizer", "load_model", "save_model"]
