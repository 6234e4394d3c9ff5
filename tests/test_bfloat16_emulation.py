"""Emulated bfloat16 weights: float32 arithmetic on bfloat16 values, losing what real bfloat16 loses."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from relapse.errors import ConfigError
from relapse.methods.unlearn import UnlearnConfig, unlearn_model
from relapse.models.io import round_to_bfloat16_
from relapse.runtime import RunContext
from relapse.training.finetune import TrainConfig
from relapse.training.loop import LoopConfig, run_loop


def test_rounding_is_to_nearest_bfloat16_and_keeps_dtype():
    one_ulp = 2.0**-7  # bfloat16 keeps 8 significant bits: 1 + 2^-7 is the next value after 1
    values = torch.tensor([1.0 + 0.4 * one_ulp, 1.0 + 0.6 * one_ulp, -3.0, 1e-3], dtype=torch.float32)
    round_to_bfloat16_([values])
    assert values.dtype == torch.float32
    assert values[0].item() == 1.0
    assert values[1].item() == 1.0 + one_ulp
    assert values[2].item() == -3.0
    assert torch.equal(values, values.to(torch.bfloat16).to(torch.float32))


def _regression(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A linear layer whose weights span small (|w| ~ 1e-3) to large (|w| ~ 2) magnitudes, bfloat16-exact."""
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(32, 4, bias=False)
    with torch.no_grad():
        scales = torch.logspace(-3, 0.3, 32)
        weight = torch.randn(4, 32, generator=generator) * scales
        layer.weight.copy_(weight.to(torch.bfloat16).float())
    inputs = torch.randn(64, 32, generator=generator).to(torch.bfloat16).float()
    targets = torch.randn(64, 4, generator=generator).to(torch.bfloat16).float()
    return layer.to(dtype), inputs.to(dtype), targets.to(dtype)


def _train(mode: str, lr: float, steps: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
    layer, inputs, targets = _regression(dtype)
    start = layer.weight.detach().float().clone()

    def loss_fn(model, batch):
        return torch.nn.functional.mse_loss(model(batch["x"]).float(), batch["y"].float()), {}

    run_loop(
        layer,
        LoopConfig(lr=lr, max_steps=steps, max_grad_norm=None),
        lambda step, micro: {"x": inputs, "y": targets},
        loss_fn,
        run_key="test",
        progress=False,
        emulate_bfloat16=mode == "emulated",
    )
    return start, layer.weight.detach().float()


def test_emulated_weights_stay_on_bfloat16_values():
    _, end = _train("emulated", lr=1e-3)
    assert torch.equal(end, end.to(torch.bfloat16).float())


def test_emulation_loses_the_same_small_updates_as_real_bfloat16():
    lr = 1e-3  # Adam's first steps move each weight by ~lr: below half a bfloat16 step once |w| > ~0.25
    start, float32_end = _train("float32", lr)
    _, emulated_end = _train("emulated", lr)
    _, real_end = _train("bfloat16", lr)
    # Above 0.5 half a bfloat16 step is >= 2^-9 ~ 2e-3: each step's update is rounded away, and since the
    # weights are stored rounded, the updates never add up. Below 0.05 half a step is <= 2^-13 ~ 1.2e-4.
    large = start.abs() > 0.5
    small = start.abs() < 0.05
    assert large.sum() >= 10 and small.sum() >= 40
    moved = {
        "float32": float32_end != start,
        "emulated": emulated_end != start,
        "bfloat16": real_end != start,
    }
    assert moved["float32"].all()
    assert not moved["emulated"][large].any() and not moved["bfloat16"][large].any()
    assert moved["emulated"][small].all() and moved["bfloat16"][small].all()
    agreement = (moved["emulated"] == moved["bfloat16"]).float().mean()
    assert agreement >= 0.95
    # Where both moved, they moved the same way and by about as much.
    both = moved["emulated"] & moved["bfloat16"]
    emulated_step, real_step = (emulated_end - start)[both], (real_end - start)[both]
    assert (torch.sign(emulated_step) == torch.sign(real_step)).float().mean() >= 0.95
    assert torch.allclose(emulated_step, real_step, rtol=0.1, atol=2e-4)


def test_unknown_training_precision_is_a_clear_error():
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        TrainConfig(dtype="float8")
    with pytest.raises(ConfigError, match="--weights must be one of"):
        UnlearnConfig(weights="fp16-emulated")
    with pytest.raises(ConfigError, match="autocast"):
        UnlearnConfig(weights="bfloat16-emulated", autocast_bf16=True)


def test_unlearning_with_emulated_bfloat16_matches_real(trained_small, small_benchmark_dir, tmp_path):
    settings = {"method": "ga", "lr": 1e-4, "max_steps": 2, "batch_size": 8, "eval_every": 100}
    results = {
        weights: unlearn_model(
            trained_small.path,
            small_benchmark_dir,
            tmp_path / weights,
            UnlearnConfig(weights=weights, **settings),
            run=RunContext(progress=False),
        )
        for weights in ("bfloat16-emulated", "bfloat16")
    }
    start = load_file(str(trained_small.path / "model.safetensors"))
    emulated = load_file(str(results["bfloat16-emulated"].path / "model.safetensors"))
    real = load_file(str(results["bfloat16"].path / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in emulated.values())
    agree = total = 0
    for name, weight in start.items():
        rounded = weight.to(torch.bfloat16).float()
        assert torch.equal(emulated[name], emulated[name].to(torch.bfloat16).float())
        moved_emulated = emulated[name] != rounded
        moved_real = real[name].float() != rounded
        agree += int((moved_emulated == moved_real).sum())
        total += weight.numel()
    # Which weights can move at all is what the precision decides; the emulation must decide it alike.
    assert agree / total >= 0.95
    recorded = results["bfloat16-emulated"].record
    assert recorded["config"]["weights"] == "bfloat16-emulated"
    assert 0 < recorded["weight_change"]["moved_share"] < 1
