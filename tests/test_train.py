"""Training: memorisation, the cache, resume after a kill, refusal to overwrite."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import relapse.training.finetune as train_module
from relapse.data import load_benchmark
from relapse.errors import ConfigError
from relapse.metrics.qa import qa_recall
from relapse.models import load_model
from relapse.runtime import RunContext
from relapse.training.finetune import train_model
from tests.conftest import small_train_config


def test_tiny_model_memorises_small_benchmark(trained_small, small_benchmark_dir):
    record = trained_small.record
    assert record["stopped_early"], "the stop rule should fire before the step budget"
    # Recomputed from the saved model, not taken from the record.
    model, tokenizer = load_model(trained_small.path)
    benchmark = load_benchmark(small_benchmark_dir)
    assert qa_recall(model, tokenizer, benchmark.forget_qa)["value"] >= 0.95
    assert qa_recall(model, tokenizer, benchmark.retain_qa)["value"] >= 0.95
    assert record["final"]["recall_forget"] >= 0.95
    assert record["seed"] == 1 and "torch" in record["versions"]
    assert len(record["loss_curve"]) == record["steps"]
    assert record["loss_curve"][-1] < record["loss_curve"][0] / 3


def test_second_call_is_a_cache_hit(trained_small, small_benchmark_dir):
    weights = trained_small.path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = train_model(
        small_benchmark_dir, trained_small.path, small_train_config(), run=RunContext(progress=False)
    )
    assert again.cached
    assert weights.stat().st_mtime_ns == mtime
    assert again.record["cache_key"] == trained_small.record["cache_key"]


def test_cache_key_depends_on_data_config_and_seed(small_benchmark_dir, tmp_path):
    base_key = train_module.train_cache_key(small_benchmark_dir, small_train_config(), None)
    assert train_module.train_cache_key(small_benchmark_dir, small_train_config(), None) == base_key
    assert train_module.train_cache_key(small_benchmark_dir, small_train_config(seed=2), None) != base_key
    assert train_module.train_cache_key(small_benchmark_dir, small_train_config(lr=5e-4), None) != base_key
    # Checkpoint cadence does not change the weights, so it does not change the key.
    assert (
        train_module.train_cache_key(small_benchmark_dir, small_train_config(checkpoint_every=7), None)
        == base_key
    )
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in small_benchmark_dir.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    with open(changed / "retain.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "One more sentence about nobody."}) + "\n")
    assert train_module.train_cache_key(changed, small_train_config(), None) != base_key


def test_refuses_to_overwrite_a_different_model(trained_small, small_benchmark_dir):
    with pytest.raises(ConfigError, match="--overwrite"):
        train_model(
            small_benchmark_dir,
            trained_small.path,
            small_train_config(seed=5, max_steps=1),
            run=RunContext(progress=False),
        )


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_resume_after_kill_gives_identical_weights(small_benchmark_dir, tmp_path, monkeypatch):
    config = small_train_config(max_steps=12, checkpoint_every=5, eval_every=100, stop_recall=None)
    straight = train_model(small_benchmark_dir, tmp_path / "straight", config, run=RunContext(progress=False))

    real_collate = train_module.collate
    calls = {"n": 0}

    def dying_collate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # during step 8, after the checkpoint at step 5
            raise KeyboardInterrupt
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(train_module, "collate", dying_collate)
    with pytest.raises(KeyboardInterrupt):
        train_model(small_benchmark_dir, tmp_path / "killed", config, run=RunContext(progress=False))
    assert not (tmp_path / "killed").exists(), "a killed run must not leave a model behind"
    assert (tmp_path / ".killed.work" / "checkpoint" / "state.json").exists()
    monkeypatch.setattr(train_module, "collate", real_collate)

    resumed = train_model(small_benchmark_dir, tmp_path / "killed", config, run=RunContext(progress=False))
    assert resumed.record["resumed_from_step"] == 5
    assert resumed.record["steps"] == 12
    assert not (tmp_path / ".killed.work").exists(), "the work folder is removed once the model is saved"
    a, b = _weights(straight.path), _weights(resumed.path)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.record["loss_curve"] == straight.record["loss_curve"]


def test_checkpoint_of_another_run_is_not_resumed(small_benchmark_dir, tmp_path, monkeypatch):
    config = small_train_config(max_steps=8, checkpoint_every=3, eval_every=100, stop_recall=None)
    real_collate = train_module.collate

    def dying_collate(*args, **kwargs):
        raise KeyboardInterrupt

    # Leave a checkpoint behind from a run with other settings.
    calls = {"n": 0}

    def die_at_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(train_module, "collate", die_at_five)
    with pytest.raises(KeyboardInterrupt):
        train_model(small_benchmark_dir, tmp_path / "m", config, run=RunContext(progress=False))
    monkeypatch.setattr(train_module, "collate", real_collate)
    with pytest.raises(ConfigError, match="different run"):
        train_model(
            small_benchmark_dir,
            tmp_path / "m",
            small_train_config(max_steps=8, lr=1e-4, checkpoint_every=3, eval_every=100, stop_recall=None),
            run=RunContext(progress=False),
        )


def test_retrained_model_does_not_know_the_forget_set(small_benchmark_dir, tmp_path):
    result = train_model(
        small_benchmark_dir,
        tmp_path / "retrained",
        small_train_config(on="retain"),
        run=RunContext(progress=False),
    )
    assert result.record["final"]["recall_retain"] >= 0.95
    assert result.record["final"]["recall_forget"] <= 0.2
    assert all(
        set(entry) >= {"step", "recall_retain"} and "recall_forget" not in entry
        for entry in result.record["history"]
    )


def test_fine_tune_from_an_existing_model(trained_small, small_benchmark_dir, tmp_path):
    config = small_train_config(on="retain", max_steps=3, stop_recall=None, lr=1e-4, warmup_steps=0)
    result = train_model(
        small_benchmark_dir,
        tmp_path / "ft",
        config,
        base=str(trained_small.path),
        run=RunContext(progress=False),
    )
    assert result.record["base_identity"] == f"relapse:{trained_small.record['cache_key']}"
    before, after = _weights(trained_small.path), _weights(result.path)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "fine-tuning changed nothing"
    # Three small steps do not wipe out the memorised facts.
    assert result.record["final"]["recall_retain"] >= 0.8
