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


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of decoder blocks: the ``nn.ModuleList`` with one entry per hidden layer.

    Found by shape rather than by attribute path, so it works for Llama (``model.layers``), GPT-2
    (``transformer.h``) and models wrapped by PEFT alike.
    """
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    for candidate in lists:
        if count is None or len(candidate) == count:
            return candidate
    raise ValueError("this model has no recognisable stack of decoder layers")


#: Names of a decoder block's feed-forward sub-module in common architectures.
MLP_NAMES = ("mlp", "feed_forward", "ffn")


def mlp_weights(model: torch.nn.Module, layers: list[int]) -> dict[str, torch.nn.Parameter]:
    """The ``nn.Linear`` weights of the MLPs of the decoder blocks ``layers``, by parameter name."""
    blocks = decoder_layers(model)
    wanted = set()
    for index in layers:
        for name, module in blocks[index].named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[0] in MLP_NAMES:
                wanted.add(id(module.weight))
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}
