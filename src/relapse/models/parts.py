"""Which weights of a causal LM are which: the decoder's linear layers, embeddings, LM head.

Quantization attacks and SURE both act on "every ``nn.Linear`` inside the decoder blocks", the weights
the paper quantizes and SURE selects from; embeddings and the LM head are kept apart (quantized only on
request, never selected by SURE).
"""

from __future__ import annotations

import torch


def decoder_linear_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Weights of every ``nn.Linear`` except the output embedding (LM head), by parameter name."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            found[f"{module_name}.weight"] = module.weight
    return found


def embedding_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The input embedding matrix, by parameter name."""
    embedding = model.get_input_embeddings()
    return {name: p for name, p in model.named_parameters() if p is embedding.weight}


def lm_head_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LM head matrix, by parameter name (absent when tied to the input embedding)."""
    head = model.get_output_embeddings()
    if head is None:
        return {}
    return {name: p for name, p in model.named_parameters() if p is head.weight}
