"""Unlearning end to end on the tiny model: methods forget, the machinery holds, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import relapse.methods.losses as losses_module
from relapse.cli import main
from relapse.data import load_benchmark
from relapse.data.batching import tokenize_answers_only
from relapse.errors import ConfigError
from relapse.methods.sure import candidate_parameters
from relapse.methods.unlearn import UnlearnConfig, unlearn_model
from relapse.metrics.qa import qa_recall
from relapse.models import load_model
from relapse.runtime import RunContext, resolve_device
from tests.conftest import weight_distance


def _config(**overrides) -> UnlearnConfig:
    settings = {"batch_size": 8, "eval_every": 2, "max_steps": 60, "checkpoint_every": 1000}
    settings.update(overrides)
    return UnlearnConfig(**settings)


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _recall(path, benchmark_dir):
    model, tokenizer = load_model(path)
    benchmark = load_benchmark(benchmark_dir)
    return (
        qa_recall(model, tokenizer, benchmark.forget_qa)["value"],
        qa_recall(model, tokenizer, benchmark.retain_qa)["value"],
    )


# Measured on this benchmark and model (seed 7 data, seed 1 training), recorded as baselines:
# GA at lr 3e-5 stops at forget 0.25 with retain 0.23 (GA has no regulariser, so retain collapses too);
# NPO+GDR at lr 3e-5, alpha 5 stops at forget 0.17 with retain 0.875.
GA_RETAIN_BASELINE = 0.15
NPO_GDR_RETAIN_BASELINE = 0.75


@pytest.fixture(scope="module")
def npo_gdr_run(trained_small, small_benchmark_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("unlearn") / "npo_gdr"
    config = _config(method="npo+gdr", lr=3e-5, alpha=5.0, stop_forget_recall=0.3)
    return unlearn_model(trained_small.path, small_benchmark_dir, out, config, run=RunContext(progress=False))


def test_ga_drives_forget_recall_down(trained_small, small_benchmark_dir, tmp_path):
    config = _config(method="ga", lr=3e-5, stop_forget_recall=0.3)
    result = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "ga", config, run=RunContext(progress=False)
    )
    forget, retain = _recall(result.path, small_benchmark_dir)  # recomputed from the saved model
    assert forget <= 0.3
    assert retain >= GA_RETAIN_BASELINE
    assert result.record["stopped_early"]


def test_npo_gdr_forgets_and_keeps_the_retain_set(npo_gdr_run, small_benchmark_dir):
    forget, retain = _recall(npo_gdr_run.path, small_benchmark_dir)
    assert forget <= 0.3
    assert retain >= NPO_GDR_RETAIN_BASELINE


def test_unlearn_record(npo_gdr_run, trained_small):
    record = json.loads((npo_gdr_run.path / "unlearn.json").read_text())
    assert record["method"] == "npo+gdr" and record["config"]["alpha"] == 5.0
    assert record["seed"] == 0 and {"torch", "transformers", "relapse"} <= set(record["versions"])
    assert record["device"] == str(resolve_device("auto"))
    assert record["reference"] == "precompute"
    assert len(record["loss_curve"]) == record["steps"] > 0
    assert record["history"][-1]["recall_forget"] <= 0.3
    assert record["model_identity"] == f"relapse:{trained_small.record['cache_key']}"
    start, end = _weights(trained_small.path), _weights(npo_gdr_run.path)
    expected = sum(float((end[k] - start[k]).abs().sum()) for k in start) / sum(
        v.numel() for v in start.values()
    )
    assert record["weight_change"]["mean_abs"] == pytest.approx(expected, rel=1e-5)
    assert record["wall_time_s"] > 0


def test_second_call_is_cached(npo_gdr_run, trained_small, small_benchmark_dir):
    config = _config(method="npo+gdr", lr=3e-5, alpha=5.0, stop_forget_recall=0.3)
    again = unlearn_model(
        trained_small.path, small_benchmark_dir, npo_gdr_run.path, config, run=RunContext(progress=False)
    )
    assert again.cached and again.record["cache_key"] == npo_gdr_run.record["cache_key"]
    with pytest.raises(ConfigError, match="--overwrite"):
        unlearn_model(
            trained_small.path,
            small_benchmark_dir,
            npo_gdr_run.path,
            _config(method="ga"),
            run=RunContext(progress=False),
        )


def test_precomputed_reference_equals_a_reference_model(trained_small, small_benchmark_dir, tmp_path):
    runs = {}
    for mode in ("precompute", "model"):
        config = _config(method="npo+klr", lr=1e-4, max_steps=3, reference=mode)
        runs[mode] = unlearn_model(
            trained_small.path, small_benchmark_dir, tmp_path / mode, config, run=RunContext(progress=False)
        )
        assert runs[mode].record["reference"] == mode
    assert runs["precompute"].record["loss_curve"] == pytest.approx(
        runs["model"].record["loss_curve"], rel=1e-5
    )
    a, b = _weights(runs["precompute"].path), _weights(runs["model"].path)
    start = _weights(trained_small.path)
    # Batching differs (padding), so reference values differ in the last float bits; AdamW's first steps
    # can then flip the sign of a few near-zero updates. The two runs must still agree to 1e-3 of the update.
    moved, apart = weight_distance(a, start), weight_distance(a, b)
    assert moved > 0 and apart <= 1e-3 * moved


def test_resume_after_kill_gives_identical_weights(trained_small, small_benchmark_dir, tmp_path, monkeypatch):
    config = _config(
        method="npo+klr",
        lr=1e-3,
        max_steps=8,
        checkpoint_every=3,
        eval_every=100,
        sure_top=0.3,
        sure_granularity="neuron",
        weight_decay=0.1,
    )
    straight = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "straight", config, run=RunContext(progress=False)
    )

    real_npo = losses_module.npo_loss
    calls = {"n": 0}

    def dying_npo(*args, **kwargs):
        calls["n"] += 1
        if (
            calls["n"] == 7
        ):  # 1 call for saliency, then one per step: dies in step 6, after the step-3 checkpoint
            raise KeyboardInterrupt
        return real_npo(*args, **kwargs)

    monkeypatch.setattr(losses_module, "npo_loss", dying_npo)
    with pytest.raises(KeyboardInterrupt):
        unlearn_model(
            trained_small.path,
            small_benchmark_dir,
            tmp_path / "killed",
            config,
            run=RunContext(progress=False),
        )
    monkeypatch.setattr(losses_module, "npo_loss", real_npo)
    assert not (tmp_path / "killed").exists()

    resumed = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "killed", config, run=RunContext(progress=False)
    )
    assert resumed.record["resumed_from_step"] == 3
    assert resumed.record["loss_curve"] == straight.record["loss_curve"]
    a, b = _weights(straight.path), _weights(resumed.path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.record["sure"]["frozen_elements_identical"]


@pytest.mark.parametrize("granularity", ["module", "neuron"])
def test_sure_mask_holds_bit_for_bit_in_a_full_run(trained_small, small_benchmark_dir, tmp_path, granularity):
    config = _config(
        method="npo+gdr", lr=1e-3, max_steps=4, sure_top=0.1, sure_granularity=granularity, weight_decay=0.1
    )
    result = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "sure", config, run=RunContext(progress=False)
    )
    sure = result.record["sure"]
    assert sure["frozen_elements_identical"] and sure["changed_tensors"] == []
    start, end = _weights(trained_small.path), _weights(result.path)
    model, _ = load_model(trained_small.path)
    candidates = set(candidate_parameters(model))
    # Nothing outside the candidates (embeddings, norms, LM head) moved.
    assert all(torch.equal(start[k], end[k]) for k in start if k not in candidates)
    changed_rows = {k: int((start[k] != end[k]).any(dim=1).sum()) for k in candidates}
    if granularity == "module":
        selected = {entry["name"] for entry in sure["selected"]}
        assert {k for k, rows in changed_rows.items() if rows} == selected
    else:
        selected = {entry["name"]: entry["rows"] for entry in sure["selected"]}
        for name, rows in changed_rows.items():
            assert rows <= selected.get(name, 0), name
        assert sum(changed_rows.values()) > 0
    moved = sum(int((start[k] != end[k]).sum()) for k in start)
    assert moved <= sure["trainable_elements"]


def test_lora_is_merged_on_save(trained_small, small_benchmark_dir, tmp_path):
    pytest.importorskip("peft")
    config = _config(method="ga+gdr", lr=1e-3, max_steps=3, lora_r=4)
    result = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "lora", config, run=RunContext(progress=False)
    )
    start, end = _weights(trained_small.path), _weights(result.path)
    assert set(start) == set(end), "adapters must be merged into the base weights"
    assert any(not torch.equal(start[k], end[k]) for k in start)
    # LoRA leaves embeddings and the LM head alone.
    assert torch.equal(start["model.embed_tokens.weight"], end["model.embed_tokens.weight"])
    assert torch.equal(start["lm_head.weight"], end["lm_head.weight"])


def test_bfloat16_weights_have_no_float32_master_copy(trained_small, small_benchmark_dir, tmp_path):
    config = _config(method="ga", lr=1e-3, max_steps=1, weights="bfloat16", eval_every=100)
    result = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "bf16", config, run=RunContext(progress=False)
    )
    saved = _weights(result.path)
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    start = _weights(trained_small.path)
    assert any(not torch.equal(start[k].to(torch.bfloat16), saved[k]) for k in start)


def test_autocast_keeps_float32_weights(trained_small, small_benchmark_dir, tmp_path):
    config = _config(method="ga", lr=1e-3, max_steps=1, autocast_bf16=True, eval_every=100)
    result = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "ac", config, run=RunContext(progress=False)
    )
    assert all(t.dtype == torch.float32 for t in _weights(result.path).values())


def test_muse_compatible_variant_is_recorded(trained_small, small_benchmark_dir, tmp_path):
    config = _config(method="npo+klr", lr=1e-4, max_steps=2, variant="muse-compatible", eval_every=100)
    result = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "muse", config, run=RunContext(progress=False)
    )
    assert result.record["config"]["variant"] == "muse-compatible"
    assert result.record["reference"] == "model"
    with pytest.raises(ConfigError, match="reference"):
        unlearn_model(
            trained_small.path,
            small_benchmark_dir,
            tmp_path / "x",
            _config(method="npo", variant="muse-compatible", reference="precompute"),
            run=RunContext(progress=False),
        )


def test_answer_only_labels_count_just_the_answer(trained_small, small_benchmark_dir):
    _, tokenizer = load_model(trained_small.path)
    pair = load_benchmark(small_benchmark_dir).forget_qa[0]
    prompt = f"Question: {pair.question}\nAnswer:"
    (example,) = tokenize_answers_only(tokenizer, [prompt], [pair.answer], 256)
    counted = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    assert counted[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(counted[:-1]) == f" {pair.answer}"
    assert tokenizer.decode(example.input_ids, skip_special_tokens=True) == f"{prompt} {pair.answer}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "sgd"}, "unknown method"),
        ({"tokens": "answer"}, "--tokens answer"),
        ({"sure_top": 0.0}, "--sure-top"),
        ({"lora_r": 4, "sure_top": 0.1}, "cannot be combined"),
        ({"sure_per_step": True}, "--sure-per-step"),
        ({"weights": "bfloat16", "autocast_bf16": True}, "autocast"),
    ],
)
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        UnlearnConfig(**overrides)


def test_unlearn_command(trained_small, small_benchmark_dir, tmp_path, capsys):
    args = [
        "unlearn",
        "--model",
        str(trained_small.path),
        "--data",
        str(small_benchmark_dir),
        "--out",
        str(tmp_path / "u"),
        "--method",
        "ga+gdr",
        "--steps",
        "2",
        "--eval-every",
        "100",
        "--quiet",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ga+gdr" in out and "2 steps" in out
    assert json.loads((tmp_path / "u" / "unlearn.json").read_text())["steps"] == 2
    assert main([*args[:-1], "--tokens", "answer", "--quiet"]) == 2
    assert "--tokens answer" in capsys.readouterr().err


def test_stop_on_forget_nll(trained_small, small_benchmark_dir, tmp_path):
    config = _config(method="ga", lr=3e-5, stop_forget_nll=2.0, eval_every=2)
    result = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "nll", config, run=RunContext(progress=False)
    )
    history = result.record["history"]
    assert result.record["stopped_early"] and history[-1]["nll_forget"] >= 2.0
    assert all(entry["nll_forget"] < 2.0 for entry in history[:-1])
    assert result.record["steps"] < 60
