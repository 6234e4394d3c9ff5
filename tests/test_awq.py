"""AWQ: never worse than RTN on its calibration data, much better when a few channels dominate."""

from __future__ import annotations

import torch

from relapse.attacks import AttackContext, applied, get_attack
from relapse.attacks.awq import awq_quantize_matrix
from relapse.attacks.calibration import LayerStats
from relapse.attacks.rtn import QuantScheme, fake_quantize
from relapse.data import load_benchmark
from relapse.models import load_model


def _stats(x: torch.Tensor) -> LayerStats:
    return LayerStats(x.T @ x / x.shape[0], x.abs().mean(dim=0), x.shape[0])


def _error(w_hat, w, x) -> float:
    return float(((x @ (w_hat - w).T) ** 2).sum())


def test_awq_is_never_worse_than_rtn_on_calibration_data():
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(256, 64, generator=generator) * torch.rand(64, generator=generator) * 3
        w = torch.randn(32, 64, generator=generator) * 0.05
        scheme = QuantScheme(4, 32)
        awq, alpha = awq_quantize_matrix(w, _stats(x), scheme)
        assert 0.0 <= alpha <= 1.0
        assert _error(awq, w, x) <= _error(fake_quantize(w, scheme), w, x) * (1 + 1e-6)


def test_awq_protects_salient_channels():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=generator)
    x[:, :4] *= 30.0  # a few input channels carry most of the activation
    w = torch.randn(64, 128, generator=generator) * 0.05
    scheme = QuantScheme(3, 128)
    awq, alpha = awq_quantize_matrix(w, _stats(x), scheme)
    assert alpha > 0
    assert _error(awq, w, x) < 0.7 * _error(fake_quantize(w, scheme), w, x)


def test_awq_attack_restores_and_records_alphas(trained_small, small_benchmark_dir):
    model, tokenizer = load_model(trained_small.path)
    context = AttackContext(tokenizer=tokenizer, benchmark=load_benchmark(small_benchmark_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with applied(get_attack("awq-w4-g64"), model, context) as info:
        assert set(info["alpha"]) == set(info["quantized"]) and len(info["quantized"]) == 28
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
