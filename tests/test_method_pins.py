"""The methods refactor changes no number: short runs of each method, pinned bit for bit.

The digests were computed with the code before methods became registered components (commit a10a5b2),
on this benchmark and model, on a CPU with one thread. Every weight of the saved model enters the digest,
so any change to a loss, the reference precompute, SURE's mask, bfloat16 emulation or the order of
random draws shows up here. A deliberate change of a method's numbers must update its pin, and say why.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from relapse.data import synth_benchmark
from relapse.methods.unlearn import UnlearnConfig, unlearn_model
from relapse.runtime import RunContext
from relapse.training.finetune import TrainConfig, train_model

RUNS: dict[str, dict] = {
    "ga": {"method": "ga"},
    "ga+gdr": {"method": "ga+gdr"},
    "npo+gdr": {"method": "npo+gdr"},
    "npo+klr": {"method": "npo+klr"},
    "npo+klr-model": {"method": "npo+klr", "reference": "model"},
    "npo+klr-muse": {"method": "npo+klr", "variant": "muse-compatible"},
    "sure": {"method": "npo+gdr", "sure_top": 0.1, "lr": 1e-3},
    "sure-neuron-step": {
        "method": "ga+gdr",
        "sure_top": 0.2,
        "sure_granularity": "neuron",
        "sure_per_step": True,
        "lr": 1e-3,
    },
    "npo+gdr-bf16emu": {"method": "npo+gdr", "weights": "bfloat16-emulated", "lr": 1e-3},
    "ga-answer": {"method": "ga", "data": "qa", "tokens": "answer"},
}

PINS = {
    "ga": "7f66cb7bd4e66a1113093d1ce27ffd25",
    "ga+gdr": "f228ec614f918b2875924a2077229def",
    "npo+gdr": "732355d0f85fedbb2d0f568542328a03",
    "npo+klr": "2e96fa66874beddfde375881e43859d1",
    "npo+klr-model": "2e96fa66874beddfde375881e43859d1",
    "npo+klr-muse": "832c2f0497e3d4f6a4393a805e991a7b",
    "sure": "0bce724e3fdec59e14d355258871d9c6",
    "sure-neuron-step": "d27bd8f06fd529e744235dc1329e7d2d",
    "npo+gdr-bf16emu": "694ff62f278f6d37104841ed998b19dd",
    "ga-answer": "08a0b99948654655c977ebaf0fc517ca",
}


def weights_digest(path: Path) -> str:
    """sha256 over every tensor's name and raw bytes, in name order (first 32 hex digits)."""
    tensors = load_file(str(path / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


@pytest.fixture(scope="module")
def pin_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pins")
    synth_benchmark(people=12, facts_per_person=3, forget_frac=0.25, seed=3).save(root / "bench")
    config = TrainConfig(max_steps=40, eval_every=40, checkpoint_every=1000, seed=2)
    target = train_model(root / "bench", root / "target", config, run=RunContext(threads=1, progress=False))
    return root, target.path


@pytest.mark.parametrize("name", sorted(RUNS))
def test_method_weights_are_pinned(pin_setup, name):
    root, target = pin_setup
    settings = {"batch_size": 8, "max_steps": 5, "lr": 1e-4, "eval_every": 100, "checkpoint_every": 1000}
    config = UnlearnConfig(**{**settings, **RUNS[name]})
    result = unlearn_model(
        target, root / "bench", root / name, config, run=RunContext(threads=1, progress=False)
    )
    assert weights_digest(result.path) == PINS[name]
