"""llm-compressor's GPTQ/AWQ as attacks: names, the missing-package error, and (where the optional package
is installed, in its own virtual environment) a real run against our own GPTQ on a tiny random Llama."""

from __future__ import annotations

import sys

import pytest
import torch

from relapse.attacks import AttackContext, applied, get_attack
from relapse.attacks.llmcompressor import LLMCompressorAttack
from relapse.data import load_benchmark
from relapse.errors import ConfigError
from relapse.models import TinyConfig, build_tiny


@pytest.fixture(scope="module")
def random_tiny(small_benchmark_dir):
    """A randomly initialised tiny Llama (no training needed to compare quantizers) and its benchmark."""
    benchmark = load_benchmark(small_benchmark_dir)
    model, tokenizer = build_tiny(TinyConfig(), benchmark, seed=0)
    return model.eval(), tokenizer, benchmark


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    ("name", "algorithm", "preset"),
    [
        ("llmc-gptq-w4-g128", "gptq", "W4A16_ASYM"),
        ("llmc-gptq-w4-g128-sym", "gptq", "W4A16"),
        ("llmc-awq-w4-g128", "awq", "W4A16_ASYM"),
        ("llmc-awq-w4-g128-sym", "awq", "W4A16"),
    ],
)
def test_names_map_to_llmcompressor_presets(name, algorithm, preset):
    attack = get_attack(name.upper())
    assert isinstance(attack, LLMCompressorAttack)
    assert (attack.name, attack.algorithm, attack.preset, attack.kind) == (
        name,
        algorithm,
        preset,
        "quantization",
    )


@pytest.mark.parametrize(
    "name", ["llmc-gptq-w4-g64", "llmc-gptq-w3-g128", "llmc-rtn-w4-g128", "llmc-awq", "llmc-"]
)
def test_names_without_a_preset_are_refused(name):
    with pytest.raises(ConfigError, match="presets"):
        get_attack(name)


def test_awq_touches_the_norms_it_rescales_and_gptq_only_linear_weights(random_tiny):
    model, tokenizer, _ = random_tiny
    context = AttackContext(tokenizer=tokenizer)
    gptq = get_attack("llmc-gptq-w4-g128").touched(model, context)
    awq = get_attack("llmc-awq-w4-g128").touched(model, context)
    assert len(gptq) == 28 and all(p.dim() == 2 for p in gptq.values())
    assert set(gptq) < set(awq)
    assert {n for n in awq if n not in gptq} == {
        f"model.layers.{i}.{norm}.weight"
        for i in range(4)
        for norm in ("input_layernorm", "post_attention_layernorm")
    }


@pytest.mark.parametrize("name", ["llmc-gptq-w4-g128", "llmc-awq-w4-g128"])
def test_missing_package_is_a_one_line_config_error(random_tiny, monkeypatch, name):
    """Simulated absence (a None entry in sys.modules makes the import fail) even where it is installed."""
    model, tokenizer, benchmark = random_tiny
    monkeypatch.setitem(sys.modules, "llmcompressor", None)
    before = _snapshot(model)
    context = AttackContext(tokenizer=tokenizer, benchmark=benchmark)
    with (
        pytest.raises(ConfigError, match=r"pip install llmcompressor") as caught,
        applied(get_attack(name), model, context),
    ):
        pytest.fail("the block must not run without llm-compressor")
    assert "\n" not in str(caught.value)
    _assert_identical(model, before)


def test_llmcompressor_gptq_and_awq_against_ours(random_tiny):
    pytest.importorskip("llmcompressor")
    model, tokenizer, benchmark = random_tiny
    context = AttackContext(tokenizer=tokenizer, benchmark=benchmark)
    assert len(benchmark.general) >= 160  # calibration uses general[:128]; KL the held-out rest
    batch = tokenizer(benchmark.general[128:160], return_tensors="pt", padding=True, padding_side="right")
    mask = batch["attention_mask"].bool()
    before = _snapshot(model)
    with torch.no_grad():
        reference = torch.log_softmax(model(**batch).logits, dim=-1)

    def run(name: str) -> tuple[float, dict]:
        with applied(get_attack(name), model, context) as info, torch.no_grad():
            log_probs = torch.log_softmax(model(**batch).logits, dim=-1)
            weight = model.model.layers[0].mlp.down_proj.weight.detach().clone()
        kl = float((reference.exp() * (reference - log_probs)).sum(-1)[mask].mean())
        return kl, {**info, "weight": weight}

    ours, _ = run("gptq-w4-g128")
    rtn, _ = run("rtn-w4-g128")
    theirs, info = run("llmc-gptq-w4-g128")
    _assert_identical(model, before)
    assert len(info["quantized"]) == 28 and info["rescaled"] == [] and info["preset"] == "W4A16_ASYM"
    # The copied-back weights lie on a 4-bit grid: at most 16 values in each row of each group of 128.
    groups = info["weight"].reshape(-1, 128)
    assert max(len(torch.unique(row)) for row in groups) <= 16
    # Same algorithm, same calibration tokens: the same ballpark (llm-compressor orders columns by the
    # Hessian diagonal, we do not), and both well ahead of RTN.
    assert 0.5 < theirs / ours < 2.0, (theirs, ours)
    assert theirs < rtn and ours < rtn, (theirs, ours, rtn)
    awq, info = run("llmc-awq-w4-g128")
    _assert_identical(model, before)
    # AWQ folds its scales into the RMSNorm weights before q/k/v and gate/up (a norm whose search picks
    # scale 1 everywhere stays as it was).
    assert len(info["quantized"]) == 28 and 0 < len(info["rescaled"]) <= 8
    assert all(n.endswith("layernorm.weight") for n in info["rescaled"])
    assert awq < 2.0 * rtn, (awq, rtn)
