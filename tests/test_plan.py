"""relapse plan: parameter counts against published ones and real models, memory by hand, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from relapse.cli import main
from relapse.errors import ConfigError
from relapse.models.plan import GIB, PRESETS, Architecture, load_architecture, plan_memory


@pytest.mark.parametrize(
    ("preset", "published"),
    [("llama-2-7b", 6_738_415_616), ("smollm2-135m", 134_515_008), ("llama-3.1-8b", 8_030_261_248)],
)
def test_preset_parameter_counts_are_the_published_ones(preset, published):
    assert Architecture.from_config(PRESETS[preset]).parameters() == published


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_equals_a_real_models(tied):
    config = LlamaConfig(
        vocab_size=301,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,  # not hidden / heads: the config's own head_dim counts
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    arch = Architecture.from_config(config.to_dict())
    assert arch.parameters() == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    assert arch.layer_parameters() == sum(p.numel() for p in layer.parameters())


def test_lora_count_equals_pefts_trainable_parameters():
    peft = pytest.importorskip("peft")
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets))
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert Architecture.from_config(config.to_dict()).lora_parameters(4) == trainable


def test_memory_by_hand():
    arch = Architecture(
        vocab=100, hidden=8, layers=2, intermediate=16, heads=2, kv_heads=2, head_dim=4, tied=True
    )
    params = arch.parameters()  # 100*8 + 2*(4*8*8 + 3*8*16 + 16) + 8 = 800 + 2*656 + 8
    assert params == 2120
    rows = {(r.strategy, r.precision): r for r in plan_memory(arch, gpus=4, batch_size=2, seq_len=5)}
    tokens = 10
    # float32: 16 bytes per parameter; activations 4-byte units: each layer keeps its input (4 * 8 per token),
    # one layer holds 17 units of 4 * 8 per token, and the logits take 100 * 4 bytes per token.
    activations = tokens * (2 * 4 * 8 + 17 * 4 * 8) + tokens * 100 * 4
    assert rows["ddp", "float32"].model_states == 16 * params
    assert rows["ddp", "float32"].activations == activations
    assert rows["zero2", "float32"].model_states == 4 * params + (12 * params) // 4
    assert rows["fsdp", "float32"].model_states == (16 * params) // 4 + 2 * arch.layer_parameters() * 4
    assert rows["lora", "float32"].model_states == 4 * params + 16 * arch.lora_parameters(8)
    assert rows["ddp", "bfloat16"].model_states == 8 * params
    assert rows["ddp", "bfloat16-mixed"].model_states == 16 * params
    assert rows["ddp", "float32"].total == 16 * params + activations


def test_a_7b_model_needs_sharding_in_float32():
    rows = {(r.strategy, r.precision): r for r in plan_memory(load_architecture("llama-2-7b")[0], gpus=4)}
    assert rows["ddp", "float32"].model_states / GIB == pytest.approx(6_738_415_616 * 16 / GIB)
    assert not rows["ddp", "float32"].fits and rows["fsdp", "float32"].fits


def test_cli_plan_json_and_errors(tmp_path, capsys):
    assert main(["plan", "llama-2-7b", "--gpus", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["parameters"] == 6_738_415_616 and plan["settings"]["gpus"] == 8
    assert {(r["strategy"], r["precision"]) for r in plan["rows"]} >= {
        ("fsdp", "float32"),
        ("lora", "bfloat16"),
    }
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["smollm2-135m"]))
    assert main(["plan", str(tmp_path)]) == 0
    assert "0.135 B parameters" in capsys.readouterr().out
    for argv, words in (
        (["plan", str(tmp_path / "nowhere")], "neither a preset"),
        (["plan", "llama-2-7b", "--gpus", "0"], "gpus must be >= 1"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("relapse: error:") and words in err and "\n" not in err


def test_a_config_without_the_sizes_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="no hidden_size"):
        load_architecture(str(tmp_path))
