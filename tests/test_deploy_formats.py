"""Deployment formats: our GGUF block quantizers against the gguf package, bitsandbytes grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relapse.attacks import AttackContext, applied, get_attack
from relapse.attacks.deploy import GGUF_FORMATS, bnb_fake_quantize, gguf_fake_quantize
from relapse.errors import ConfigError
from relapse.models import load_model

# The NF4 code book of bitsandbytes (Dettmers et al., QLoRA, arXiv 2305.14314, appendix E).
NF4_CODES = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def _weights(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=generator) * 0.05
    w[0, :32] = 0.0  # an all-zero block
    w[1, 32:64] = 0.3  # a constant block
    w[2, 64:96] *= 40  # a block with a large range
    return w


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_gguf_matches_the_gguf_package_round_trip_bit_for_bit(fmt):
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    for seed in range(3):
        w = _weights(seed)
        reference = quants.dequantize(quants.quantize(w.numpy(), qtype), qtype)
        assert np.array_equal(gguf_fake_quantize(w, fmt).numpy(), reference)


def test_gguf_errors():
    with pytest.raises(ConfigError, match="multiple of 32"):
        gguf_fake_quantize(torch.zeros(4, 48), "q4_0", "layer.weight")
    with pytest.raises(ConfigError, match="unknown"):
        get_attack("gguf-q4_k")


def test_q8_0_rounds_halves_away_from_zero():
    # d = 127/127 = 1 for this block, so x / d lands exactly on halves.
    block = torch.tensor([[127.0, 2.5, -2.5, 0.5, -0.5] + [0.0] * 27])
    assert gguf_fake_quantize(block, "q8_0")[0, :5].tolist() == [127.0, 3.0, -3.0, 1.0, -1.0]


def test_bnb_nf4_values_lie_on_the_code_book_times_the_block_absmax():
    pytest.importorskip("bitsandbytes")
    w = _weights()
    out = bnb_fake_quantize(w, "nf4").reshape(-1, 64)
    absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    codes = torch.tensor(NF4_CODES)
    normalized = torch.where(absmax > 0, out / absmax, torch.zeros_like(out))
    distance_to_book = (normalized.unsqueeze(-1) - codes).abs().amin(dim=-1)
    assert float(distance_to_book.max()) < 1e-3
    # Each weight went to its nearest code (up to the code book's own rounding of the midpoint).
    original = torch.where(absmax > 0, w.reshape(-1, 64) / absmax, torch.zeros_like(out))
    nearest = codes[(original.unsqueeze(-1) - codes).abs().argmin(dim=-1)]
    assert float((nearest - normalized).abs().gt(1e-3).float().mean()) < 0.01


def test_bnb_int8_is_per_row_absmax():
    pytest.importorskip("bitsandbytes")
    w = _weights()
    out = bnb_fake_quantize(w, "int8")
    step = w.abs().amax(dim=1, keepdim=True) / 127
    # bitsandbytes works in float16, whose rounding adds a few percent of a step at most.
    assert bool(((out - w).abs() <= 0.55 * step).all())
    codes = out / step
    assert float((codes - codes.round()).abs().max()) < 0.1
    # ...but it is a real 8-bit grid: a 4-bit one would be 16 times coarser.
    assert float((out - w).abs().max()) > 0


@pytest.mark.parametrize("name", ["gguf-q4_0", "gguf-q8_0", "bnb-nf4", "bnb-fp4", "bnb-int8"])
def test_deployment_attacks_restore_exact_weights(trained_small, name):
    if name.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    model, tokenizer = load_model(trained_small.path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with applied(get_attack(name), model, AttackContext(tokenizer=tokenizer)) as info:
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == set(info["quantized"])
        assert "lm_head.weight" in info["kept"] and "model.embed_tokens.weight" in info["kept"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_bnb_attack_equals_a_model_served_with_bitsandbytes_config(trained_small, fmt):
    """The fake-quantized weights are what transformers + bitsandbytes serve for the same model on CPU."""
    functional = pytest.importorskip("bitsandbytes.functional")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=fmt, bnb_4bit_compute_dtype=torch.float32
    )
    served = AutoModelForCausalLM.from_pretrained(
        trained_small.path, quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    model, tokenizer = load_model(trained_small.path)
    with applied(get_attack(f"bnb-{fmt}"), model, AttackContext(tokenizer=tokenizer)) as info:
        ours = dict(model.named_modules())
        for name, module in served.named_modules():
            if type(module).__name__ == "Linear4bit":
                dequantized = functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                assert torch.equal(dequantized.float(), ours[name].weight), name
        # Both keep the LM head (and the embeddings) in full precision.
        assert type(served.lm_head).__name__ == "Linear"
        assert "lm_head.weight" in info["kept"]
        served_quantized = {
            f"{n}.weight" for n, m in served.named_modules() if type(m).__name__ == "Linear4bit"
        }
        assert served_quantized == set(info["quantized"])


def test_bitsandbytes_kernel_hub_notice_is_dropped_and_nothing_else(caplog):
    """bitsandbytes logs, on CPUs with AVX-512 BF16, that it could not fetch a kernel from the hub; relapse
    drops that notice (its own CPU kernels give the same numbers) and lets the logger's other lines pass."""
    import importlib.util
    import logging

    from relapse.attacks.deploy import _import_bitsandbytes

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    _import_bitsandbytes()  # the notice, if this CPU prints one, is dropped here already
    assert not [r for r in caplog.records if "kernels-community" in r.getMessage()]
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "untrusted"
        )
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
