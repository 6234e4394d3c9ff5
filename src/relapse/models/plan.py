"""Memory per device before renting GPUs: from a model's config alone, no weights loaded.

``relapse plan MODEL --gpus N`` counts the parameters of a decoder-only transformer of the Llama family
(Llama, Mistral, Qwen2, SmolLM2, ...: gated MLPs, grouped-query attention, RMS norms) from its
``config.json`` and gives, per strategy and precision, what each GPU holds while unlearning:

- **weights, gradients and optimizer state** (AdamW keeps two moments per trainable parameter):
  float32 16 bytes per parameter (4 + 4 + 8); bfloat16 with float32 master weights, the usual mixed
  precision, 16 bytes (2 weights + 2 gradients + 4 master + 8 moments); pure bfloat16 (weights, gradients
  and moments in bfloat16, no master copy: the setting where small updates round away, see
  docs/study-smollm2.md) 8 bytes;
- **sharding**: data parallel (DDP) replicates all of it; ZeRO-2 shards gradients and optimizer state
  over the GPUs; FSDP full sharding and DeepSpeed ZeRO-3 shard everything and gather one decoder layer's
  weights at a time (two, with prefetching); LoRA keeps the base weights frozen (no gradients, no
  moments) and trains adapters of rank r on every linear layer of the decoder;
- **activations** for one micro-batch: with gradient checkpointing each layer keeps its input (2 bytes
  per hidden unit and token in 16-bit) and one layer at a time holds its full activations, about 34
  bytes per hidden unit and token (Korthikanti et al., *Reducing Activation Recomputation in Large
  Transformer Models*, 2022, for a 16-bit layer without the attention matrix, which fused attention does
  not store); float32 doubles both; plus the float32 logits the loss reads (vocabulary x tokens x 4).

relapse precomputes NPO's reference log-probabilities, so no second (frozen) model is counted; KL
regularisation against a live reference adds one copy of the weights in the compute precision.
These are estimates for planning: allocator fragmentation, CUDA context (~0.5-1 GB) and framework
buffers come on top, hence the headroom in ``fits``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from relapse.errors import ConfigError

GIB = 1024**3

#: Architectures by name, from their published config.json files (so that a plan needs no hub).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "tie_word_embeddings": False,
    },
    "llama-3.1-8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
    "smollm2-135m": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
    },
}

#: Bytes per trainable parameter for weights, gradients, float32 master weights and AdamW's moments.
PRECISIONS: dict[str, dict[str, int]] = {
    "float32": {"weights": 4, "gradients": 4, "master": 0, "moments": 8},
    "bfloat16-mixed": {"weights": 2, "gradients": 2, "master": 4, "moments": 8},
    "bfloat16": {"weights": 2, "gradients": 2, "master": 0, "moments": 4},
}
STRATEGIES = ("ddp", "zero2", "fsdp", "lora")
#: Share of a GPU's memory a plan may use and still "fit" (the rest: CUDA context, fragmentation).
HEADROOM = 0.9


@dataclass(frozen=True)
class Architecture:
    """The sizes that decide a Llama-family decoder's parameter count."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "config") -> Architecture:
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                vocab=int(config["vocab_size"]),
                hidden=hidden,
                layers=int(config["num_hidden_layers"]),
                intermediate=int(config["intermediate_size"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                tied=bool(config.get("tie_word_embeddings", False)),
            )
        except KeyError as exc:
            raise ConfigError(
                f"{where} has no {exc.args[0]}: relapse plan reads Llama-family configs"
            ) from None
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: a size is not a whole number") from None

    def layer_linear_parameters(self) -> int:
        """One decoder layer's linear weights: q, k, v, o and the gated MLP's three matrices."""
        attention = (
            self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        )
        return attention + 3 * self.hidden * self.intermediate

    def layer_parameters(self) -> int:
        return self.layer_linear_parameters() + 2 * self.hidden  # two RMS norms

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden
        head = 0 if self.tied else embeddings
        return embeddings + self.layers * self.layer_parameters() + self.hidden + head

    def lora_parameters(self, rank: int) -> int:
        """Adapters of rank ``rank`` on every linear layer of the decoder: r x (inputs + outputs) each."""
        q_o = 2 * rank * (self.hidden + self.heads * self.head_dim)
        k_v = 2 * rank * (self.hidden + self.kv_heads * self.head_dim)
        mlp = 3 * rank * (self.hidden + self.intermediate)
        return self.layers * (q_o + k_v + mlp)


@dataclass(frozen=True)
class PlanRow:
    """What one GPU holds under one strategy and precision, in bytes."""

    strategy: str
    precision: str
    gpus: int
    model_states: int  # weights, gradients, master weights and optimizer moments
    activations: int
    total: int
    fits: bool | None  # within HEADROOM of the GPU's memory; None when no GPU size was given


def load_architecture(model: str) -> tuple[Architecture, str]:
    """A preset name, a model folder, or a config.json file; returns the architecture and where from."""
    if model.lower() in PRESETS:
        return Architecture.from_config(PRESETS[model.lower()], model), f"preset {model.lower()}"
    path = Path(model).expanduser()
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ConfigError(
            f"{model} is neither a preset ({', '.join(PRESETS)}) nor a model folder or config.json here"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{config_path} is not JSON") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} is not a JSON object")
    return Architecture.from_config(config.get("text_config", config), str(config_path)), str(config_path)


def plan_memory(
    arch: Architecture,
    gpus: int = 1,
    batch_size: int = 1,
    seq_len: int = 2048,
    lora_rank: int = 8,
    checkpointing: bool = True,
    gpu_memory_gb: float | None = 80.0,
) -> list[PlanRow]:
    """Bytes per GPU for every strategy and precision (see the module docstring for the model)."""
    for name, number in (("gpus", gpus), ("batch size", batch_size), ("sequence length", seq_len)):
        if number < 1:
            raise ConfigError(f"{name} must be >= 1, got {number}")
    params = arch.parameters()
    tokens = batch_size * seq_len  # per GPU: data parallel splits the batch, not the sequence
    rows = []
    for precision, sizes in PRECISIONS.items():
        activation_bytes = 2 if precision != "float32" else 4
        per_token_layer = activation_bytes * arch.hidden
        layer_full = 17 * per_token_layer  # 34 bytes per hidden unit in 16-bit, 68 in float32
        if checkpointing:
            activations = tokens * (arch.layers * per_token_layer + layer_full)
        else:
            activations = tokens * arch.layers * layer_full
        activations += tokens * arch.vocab * 4  # float32 logits for the loss
        full = params * sum(sizes.values())
        states = {
            "ddp": full,
            "zero2": params * sizes["weights"] + (full - params * sizes["weights"]) // gpus,
            # Everything sharded, plus two gathered decoder layers (the one computing, the one prefetched).
            "fsdp": full // gpus + 2 * arch.layer_parameters() * sizes["weights"],
            "lora": params * sizes["weights"] + arch.lora_parameters(lora_rank) * sum(sizes.values()),
        }
        for strategy in STRATEGIES:
            total = states[strategy] + activations
            fits = None if gpu_memory_gb is None else total <= HEADROOM * gpu_memory_gb * GIB
            rows.append(PlanRow(strategy, precision, gpus, states[strategy], activations, total, fits))
    return rows


def plan_json(
    arch: Architecture, source: str, rows: list[PlanRow], settings: dict[str, Any]
) -> dict[str, Any]:
    return {
        "model": source,
        "architecture": asdict(arch),
        "parameters": arch.parameters(),
        "settings": settings,
        "rows": [asdict(row) for row in rows],
    }


def plan_table(arch: Architecture, source: str, rows: list[PlanRow], gpu_memory_gb: float | None) -> str:
    """The plan as text: one line per strategy and precision, GiB per GPU."""
    labels = {
        "ddp": "data parallel (DDP)",
        "zero2": "ZeRO-2 (grads + optimizer sharded)",
        "fsdp": "FSDP full shard / ZeRO-3",
        "lora": "LoRA (base frozen)",
    }
    fits_header = f"fits {gpu_memory_gb:g} GiB" if gpu_memory_gb is not None else ""
    lines = [
        f"{source}: {arch.parameters() / 1e9:.3f} B parameters ({arch.layers} layers, hidden {arch.hidden}, "
        f"vocab {arch.vocab}); {rows[0].gpus} GPU(s); GiB per GPU",
        f"{'strategy':<36} {'precision':<15} {'states':>8} {'activations':>12} {'total':>8}  {fits_header}",
    ]
    for row in rows:
        fits = "" if row.fits is None else ("yes" if row.fits else "no")
        lines.append(
            f"{labels[row.strategy]:<36} {row.precision:<15} {row.model_states / GIB:>8.1f} "
            f"{row.activations / GIB:>12.1f} {row.total / GIB:>8.1f}  {fits}"
        )
    return "\n".join(lines)
