"""Our symmetric per-channel int8 RTN equals optimum-quanto's qint8 weights, where both define that grid."""

from __future__ import annotations

import pytest
import torch

from relapse.attacks.rtn import QuantScheme, fake_quantize, quantize


def test_symmetric_int8_per_channel_equals_optimum_quanto():
    quanto = pytest.importorskip("optimum.quanto")
    for seed in range(3):
        torch.manual_seed(seed)
        layer = torch.nn.Linear(256, 64, bias=False)
        with torch.no_grad():
            layer.weight[3] *= 25  # one row with a much larger range
        original = layer.weight.detach().clone()
        module = torch.nn.Sequential(layer)
        quanto.quantize(module, weights=quanto.qint8)
        quanto.freeze(module)
        theirs = module[0].weight.dequantize().detach()
        scheme = QuantScheme(8, None, symmetric=True)
        assert torch.equal(fake_quantize(original, scheme), theirs)
        assert torch.equal(quantize(original, scheme).scale.reshape(-1), module[0].weight._scale.reshape(-1))
