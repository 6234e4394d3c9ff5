"""GPTQ: the algorithm against the quantity it minimises, and as an attack on a real model."""

from __future__ import annotations

import json

import pytest
import torch

from relapse.attacks import AttackContext, applied, get_attack
from relapse.attacks.gptq import gptq_quantize_matrix
from relapse.attacks.rtn import QuantScheme, fake_quantize, quantize
from relapse.data import load_benchmark
from relapse.errors import ConfigError
from relapse.models import load_model


def _layer_problem(seed: int = 0, rows: int = 64, cols: int = 128, tokens: int = 512):
    """A weight matrix and correlated calibration inputs (GPTQ's advantage needs correlations)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5
    x = torch.randn(tokens, cols, generator=generator) @ mixing + 0.1 * torch.randn(
        tokens, cols, generator=generator
    )
    w = torch.randn(rows, cols, generator=generator) * 0.05
    return w, x


def _output_error(w_hat: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w_hat - w).T) ** 2).sum())


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(4, 32), QuantScheme(4, None), QuantScheme(3, 64, symmetric=True), QuantScheme(2, 32)],
)
def test_gptq_beats_rtn_on_the_calibration_output_error(scheme):
    w, x = _layer_problem()
    hessian = x.T @ x / x.shape[0]
    gptq = gptq_quantize_matrix(w, hessian, scheme, block_size=32)
    rtn = fake_quantize(w, scheme)
    assert _output_error(gptq, w, x) < 0.8 * _output_error(rtn, w, x)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_lies_on_a_grid_of_the_scheme(act_order):
    """Every row of every group takes at most 2^bits distinct values, all multiples of one step."""
    w, x = _layer_problem(seed=1)
    scheme = QuantScheme(4, 32)
    hessian = x.T @ x / x.shape[0]
    out = gptq_quantize_matrix(w, hessian, scheme, act_order=act_order)
    if act_order:  # groups follow the processing order: columns by decreasing Hessian diagonal
        out = out[:, torch.argsort(torch.diag(hessian), descending=True)]
    groups = out.reshape(out.shape[0], -1, 32)
    for row in groups.reshape(-1, 32):
        values = torch.unique(row)
        assert len(values) <= 16
        if len(values) > 1:
            gaps = torch.diff(values)
            step = gaps.min()
            assert torch.allclose(gaps / step, torch.round(gaps / step), atol=1e-3)


def test_gptq_with_identity_hessian_is_rtn():
    """With uncorrelated unit-variance inputs there is nothing to compensate: GPTQ reduces to RTN."""
    w, _ = _layer_problem(seed=2)
    scheme = QuantScheme(4, None)
    out = gptq_quantize_matrix(w, torch.eye(w.shape[1]), scheme, damp=0.0)
    expected = quantize(w, scheme).dequantize()
    assert torch.allclose(out, expected, atol=1e-6)


def test_gptq_zeroes_dead_columns_and_checks_groups():
    w, x = _layer_problem(seed=3)
    x[:, 5] = 0  # column 5 never sees input
    out = gptq_quantize_matrix(w, x.T @ x / x.shape[0], QuantScheme(4, 32))
    assert bool((out[:, 5] == 0).all())
    with pytest.raises(ConfigError, match="not divisible"):
        gptq_quantize_matrix(torch.zeros(4, 48), torch.eye(48), QuantScheme(4, 32), where="l.weight")


def test_gptq_attack_on_the_tiny_model(trained_small, small_benchmark_dir):
    model, tokenizer = load_model(trained_small.path)
    benchmark = load_benchmark(small_benchmark_dir)
    context = AttackContext(tokenizer=tokenizer, benchmark=benchmark)
    # Held-out text of the calibration distribution (GPTQ calibrates on general[:128]).
    assert len(benchmark.general) >= 160
    batch = tokenizer(benchmark.general[128:160], return_tensors="pt", padding=True, padding_side="right")
    mask = batch["attention_mask"].bool()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = torch.log_softmax(model(**batch).logits, dim=-1)

    def kl_after(name: str) -> float:
        with applied(get_attack(name), model, context) as info, torch.no_grad():
            log_probs = torch.log_softmax(model(**batch).logits, dim=-1)
            assert len(info["quantized"]) == 28
        return float((reference.exp() * (reference - log_probs)).sum(-1)[mask].mean())

    gptq, rtn = kl_after("gptq-w4-g64"), kl_after("rtn-w4-g64")
    assert gptq < rtn, (gptq, rtn)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    no_data = AttackContext(tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="calibration"), applied(get_attack("gptq-w4-g64"), model, no_data):
        pass


def test_attack_command_calibrates_on_a_user_file(trained_small, tmp_path, capsys):
    from relapse.cli import main

    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text(
        '{"text": "The town of Ostmoor lies on a river."}\n\n{"text": "A dish of fish pie."}\n'
    )
    out = tmp_path / "gptq"
    args = ["attack", "--model", str(trained_small.path), "--attack", "gptq-w4-g64", "--out", str(out)]
    assert main([*args, "--calibration", str(calibration), "--quiet"]) == 0
    record = json.loads((out / "attack.json").read_text())
    assert record["info"]["calibration_texts"] == 2 and len(record["info"]["quantized"]) == 28
    calibration.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert main([*args, "--calibration", str(calibration), "--overwrite", "--quiet"]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main([*args[:-2], "--out", str(tmp_path / "none"), "--quiet"]) == 2
    assert "--calibration" in capsys.readouterr().err
