"""Attacks on the tiny model (applied and restored bit for bit), the registry, weight diagnostics, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import relapse.attacks.relearn as relearn_module
from relapse.attacks import AttackContext, applied, get_attack, parse_attacks, weight_targets
from relapse.attacks.base import Attack
from relapse.attacks.diagnostics import tensor_diagnostics, weight_diagnostics
from relapse.attacks.registry import EXAMPLES
from relapse.attacks.rtn import QuantScheme, fake_quantize
from relapse.cli import main
from relapse.data import load_benchmark
from relapse.data.batching import tokenize_for_lm
from relapse.data.prompts import qa_text
from relapse.errors import ConfigError
from relapse.models import load_model
from tests.conftest import read_error_line

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDINGS = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def _decoder_linear_names(layers: int = 4) -> set[str]:
    parts = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    return {f"model.layers.{i}.{parts.get(n, 'mlp')}.{n}.weight" for i in range(layers) for n in LINEARS}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_identical(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    assert params.keys() == saved.keys()
    for name, p in params.items():
        assert p.dtype == saved[name].dtype, name
        assert torch.equal(p.detach(), saved[name]), name


@pytest.fixture(scope="module")
def bench(small_benchmark_dir):
    return load_benchmark(small_benchmark_dir)


@pytest.fixture
def loaded(trained_small):
    return load_model(trained_small.path)


@pytest.fixture
def context(loaded, bench):
    return AttackContext(tokenizer=loaded[1], benchmark=bench)


# --------------------------------------------------------------------------------------------------
# Which weights are attacked.


def test_weight_targets_are_the_decoder_linears_by_default(loaded):
    model, _ = loaded
    targets = weight_targets(model, AttackContext())
    assert len(targets) == 28
    assert set(targets) == _decoder_linear_names()
    params = dict(model.named_parameters())
    for name, p in targets.items():
        assert p is params[name]


@pytest.mark.parametrize(
    ("embeddings", "lm_head", "extra"),
    [(True, False, {EMBEDDINGS}), (False, True, {LM_HEAD}), (True, True, {EMBEDDINGS, LM_HEAD})],
)
def test_weight_targets_with_embeddings_and_lm_head(loaded, embeddings, lm_head, extra):
    model, _ = loaded
    context = AttackContext(include_embeddings=embeddings, include_lm_head=lm_head)
    targets = weight_targets(model, context)
    assert set(targets) == _decoder_linear_names() | extra


def test_tied_embeddings_are_one_target():
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    targets = weight_targets(model, AttackContext(include_embeddings=True, include_lm_head=True))
    assert len(targets) == 2 * 7 + 1
    assert len({id(p) for p in targets.values()}) == len(targets)
    assert sum(p is model.lm_head.weight for p in targets.values()) == 1


# --------------------------------------------------------------------------------------------------
# Every attack changes the right weights and is undone exactly.

ATTACKS = [
    "rtn-w4-g128",
    "rtn-w8-ch",
    "noise-like-rtn-w4-g128",
    "prune-30",
    "relearn-retain-3",
    "relearn-forget-half-2-lr1e-3",
]


@pytest.mark.parametrize("name", ATTACKS)
def test_applied_changes_weights_then_restores_them_bit_for_bit(loaded, context, name):
    model, _ = loaded
    model.train()
    before = _snapshot(model)
    targets = _decoder_linear_names()
    attack = get_attack(name)
    with applied(attack, model, context) as info:
        assert isinstance(info, dict)
        assert not model.training  # evaluated in eval mode
        for param_name, p in model.named_parameters():
            changed = not torch.equal(p.detach(), before[param_name])
            if param_name in targets:
                assert changed, param_name
            elif attack.kind != "relearning":  # weight attacks leave all else alone, embeddings included
                assert not changed, param_name
    assert model.training
    _assert_identical(model, before)


def test_restored_when_the_block_raises(loaded, context):
    model, _ = loaded
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), applied(get_attack("rtn-w2-g32"), model, context):
        assert not torch.equal(
            model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"]
        )
        raise RuntimeError("boom")
    _assert_identical(model, before)


class _FailsHalfway(Attack):
    name = "fails-halfway"
    kind = "noise"

    def touched(self, model, context):
        return weight_targets(model, context)

    def apply(self, model, context):
        with torch.no_grad():
            next(iter(self.touched(model, context).values())).add_(1.0)
        raise ValueError("failed after changing a weight")


def test_restored_when_the_attack_itself_fails(loaded, context):
    model, _ = loaded
    before = _snapshot(model)
    with pytest.raises(ValueError, match="failed after"), applied(_FailsHalfway(), model, context):
        pytest.fail("the block must not run when apply fails")
    _assert_identical(model, before)


def test_rtn_attack_is_fake_quantization_of_each_target(loaded, context):
    model, _ = loaded
    before = _snapshot(model)
    scheme = QuantScheme(4, 128)
    params = dict(model.named_parameters())
    with applied(get_attack("rtn-w4-g128"), model, context) as info:
        for name in _decoder_linear_names():
            assert torch.equal(params[name].detach(), fake_quantize(before[name], scheme)), name
    assert info["scheme"] == "rtn-w4-g128"
    assert info["quantized"] == sorted(_decoder_linear_names())
    assert info["kept"] == [LM_HEAD, EMBEDDINGS]


def test_rtn_attack_quantizes_embeddings_and_lm_head_on_request(loaded, bench):
    model, tokenizer = loaded
    before = _snapshot(model)
    context = AttackContext(tokenizer=tokenizer, benchmark=bench, include_embeddings=True)
    scheme = QuantScheme(8, None)
    params = dict(model.named_parameters())
    with applied(get_attack("rtn-w8-ch"), model, context) as info:
        assert torch.equal(params[EMBEDDINGS].detach(), fake_quantize(before[EMBEDDINGS], scheme))
        assert torch.equal(params[LM_HEAD].detach(), before[LM_HEAD])
    assert EMBEDDINGS in info["quantized"] and len(info["quantized"]) == 29
    assert info["kept"] == [LM_HEAD]
    _assert_identical(model, before)


def _noise_of(model, context, seed: int) -> dict[str, torch.Tensor]:
    before = _snapshot(model)
    params = dict(model.named_parameters())
    context.seed = seed
    with applied(get_attack("noise-like-rtn-w4-g128"), model, context) as info:
        noise = {name: params[name].detach() - before[name] for name in _decoder_linear_names()}
    noise["_info"] = info
    return noise


def test_noise_has_the_size_of_the_quantization_error(loaded, context):
    model, _ = loaded
    before = _snapshot(model)
    noise = _noise_of(model, context, seed=0)
    info = noise.pop("_info")
    assert info["like"] == "rtn-w4-g128"
    assert info["kept"] == [LM_HEAD, EMBEDDINGS]
    assert set(info["rms"]) == _decoder_linear_names()
    scheme = QuantScheme(4, 128)
    for name, added in noise.items():
        error = fake_quantize(before[name], scheme) - before[name]
        error_rms = float(error.pow(2).mean().sqrt())
        noise_rms = float(added.pow(2).mean().sqrt())
        assert error_rms > 0
        assert abs(noise_rms / error_rms - 1) < 0.10, name
        assert info["rms"][name] == pytest.approx(error_rms, rel=1e-5)
        # noise, not the quantization error itself
        assert abs(float(torch.nn.functional.cosine_similarity(added.flatten(), error.flatten(), 0))) < 0.1
    # every tensor draws its own noise
    first, second = (noise[f"model.layers.0.self_attn.{n}.weight"] for n in ("q_proj", "k_proj"))
    assert not torch.allclose(first / first.std(), second / second.std())


def test_noise_is_seeded(loaded, context):
    model, _ = loaded
    a = _noise_of(model, context, seed=0)
    b = _noise_of(model, context, seed=0)
    c = _noise_of(model, context, seed=1)
    assert b["_info"]["seed"] == 0 and c["_info"]["seed"] == 1
    for name in _decoder_linear_names():
        assert torch.equal(a[name], b[name]), name
        assert not torch.equal(a[name], c[name]), name


def test_prune_zeroes_the_smallest_magnitudes(loaded, context):
    model, _ = loaded
    before = _snapshot(model)
    params = dict(model.named_parameters())
    with applied(get_attack("prune-30"), model, context) as info:
        for name in _decoder_linear_names():
            after = params[name].detach()
            original = before[name].abs()
            n = original.numel()
            zero = after == 0
            assert int(zero.sum()) >= math.floor(0.3 * n), name
            assert int(zero.sum()) <= math.floor(0.3 * n) + int((before[name] == 0).sum())
            assert float(original[zero].max()) <= float(original[~zero].min()), name
            assert torch.equal(after[~zero], before[name][~zero])  # survivors untouched
            assert info["zeroed"][name] == math.floor(0.3 * n)
    assert info["share"] == pytest.approx(0.3)


def test_relearn_forget_half_measures_the_odd_forget_pairs(loaded, context, bench, monkeypatch):
    model, _ = loaded
    seen: list[list[str]] = []

    def spy(tokenizer, texts, max_length):
        seen.append(list(texts))
        return tokenize_for_lm(tokenizer, texts, max_length)

    monkeypatch.setattr(relearn_module, "tokenize_for_lm", spy)
    with applied(get_attack("relearn-forget-half-2-lr1e-3"), model, context) as info:
        pass
    n = len(bench.forget_qa)
    # trained on the even-numbered forget pairs only: the measured (odd) ones are never re-taught
    assert seen == [[qa_text(pair) for pair in bench.forget_qa[0::2]]]
    assert n >= 4
    assert info["measure_forget_qa"] == [i for i in range(n) if i % 2 == 1]
    assert info["trained_pairs"] == (n + 1) // 2
    assert info["lr"] == 1e-3 and info["steps"] == 2
    assert len(info["loss_curve"]) == 2


def test_relearn_retain_trains_on_retain_pairs_and_keeps_requires_grad(loaded, context, bench):
    model, _ = loaded
    frozen = model.model.norm.weight
    frozen.requires_grad_(False)
    with applied(get_attack("relearn-retain-1"), model, context) as info:
        assert info["measure_forget_qa"] == []
        assert info["trained_pairs"] == len(bench.retain_qa)
    assert frozen.requires_grad is False
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.norm.weight")


def test_relearn_needs_a_benchmark(loaded):
    model, tokenizer = loaded
    before = _snapshot(model)
    with (
        pytest.raises(ConfigError, match="benchmark"),
        applied(get_attack("relearn-retain-3"), model, AttackContext(tokenizer=tokenizer)),
    ):
        pytest.fail("the block must not run without a benchmark")
    _assert_identical(model, before)


# --------------------------------------------------------------------------------------------------
# Registry.


@pytest.mark.parametrize(
    "name",
    [
        *EXAMPLES,
        "rtn-w8-ch-sym",
        "noise-like-rtn-w4-g128-sym",
        "prune-5",
        "relearn-retain-3",
        "relearn-forget-half-2-lr0.001",
        "relearn-holdout-10-lr3e-05",
    ],
)
def test_attack_names_round_trip(name):
    attack = get_attack(name)
    assert attack.name == name
    assert get_attack(attack.name).name == name
    assert get_attack(name.upper()).name == name


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("rtn-w4-g128", "quantization"),
        ("noise-like-rtn-w4-g128", "noise"),
        ("prune-30", "pruning"),
        ("relearn-retain-3", "relearning"),
    ],
)
def test_attack_kinds(name, kind):
    assert get_attack(name).kind == kind


def test_relearn_learning_rate_in_the_name():
    attack = get_attack("relearn-forget-half-2-lr1e-3")
    assert (attack.split, attack.steps, attack.lr) == ("forget-half", 2, 1e-3)
    again = get_attack(attack.name)
    assert (again.split, again.steps, again.lr) == ("forget-half", 2, 1e-3)
    default = get_attack("relearn-retain-3")
    assert default.lr == get_attack("relearn-retain-3-lr1e-4").lr
    assert get_attack("relearn-retain-3-lr1e-4").name == "relearn-retain-3"


@pytest.mark.parametrize(
    "name",
    [
        "rtn-w4",
        "prune-x",
        "prune-150",
        "prune-0",
        "prune-100",
        "relearn-retain-x",
        "relearn-foo-3",
        "relearn-retain-0",
        "relearn-retain-3-lrx",
        "relearn-retain-3-lr0",
        "relearn-3",
        "quantum-4",
        "noise-like-prune-30",
        "",
    ],
)
def test_bad_attack_names(name):
    with pytest.raises(ConfigError):
        get_attack(name)


def test_fractional_prune_share_is_rejected_or_named_faithfully():
    try:
        attack = get_attack("prune-12.5")
    except ConfigError:
        return
    assert get_attack(attack.name).share == attack.share
    assert attack.name != get_attack("prune-12").name


def test_relearning_leaves_no_gradients_behind(trained_small, small_benchmark_dir):
    model, tokenizer = load_model(trained_small.path)
    context = AttackContext(tokenizer=tokenizer, benchmark=load_benchmark(small_benchmark_dir))
    with applied(get_attack("relearn-retain-2"), model, context):
        pass
    assert all(p.grad is None for p in model.parameters())
    assert get_attack("relearn-retain-2-lr0.00012345678").name == "relearn-retain-2-lr0.00012345678"


def test_parse_attacks():
    attacks = parse_attacks("rtn-w4-g128, prune-30")
    assert [a.name for a in attacks] == ["rtn-w4-g128", "prune-30"]
    assert [a.kind for a in attacks] == ["quantization", "pruning"]
    assert [a.name for a in parse_attacks(" rtn-w8-ch ,")] == ["rtn-w8-ch"]
    with pytest.raises(ConfigError):
        parse_attacks("rtn-w4-g128,prune-x")


# --------------------------------------------------------------------------------------------------
# Weight diagnostics on constructed weights. On the 2-bit asymmetric per-channel grid, a row spanning
# [0, 3] has scale exactly 1 and zero point 0: the codes are the rounded values themselves.

RTN2 = QuantScheme(2, None)
A = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
KEEP = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0]])  # whole steps: every code moves with it
ERASE = torch.tensor([[0.125, -0.25, 0.375, 0.0], [0.0, 0.25, -0.375, 0.125]])  # all below half a step
A_ROW = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
BETWEEN = torch.tensor([[0.375, 0.625, 0.375, 0.0]])  # only the 0.625 crosses into the next code


def _check(result: dict, expected: dict) -> None:
    for key, value in expected.items():
        if value is None:
            assert result[key] is None, key
        else:
            assert result[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_diagnostics_when_rounding_erases_the_update():
    # B = [[0.125, 0.75, 2.375, 3], [3, 2.25, 0.625, 0.125]] rounds to the same codes as A: Q(B) = Q(A).
    result = tensor_diagnostics(A, A + ERASE, RTN2)
    _check(
        result,
        {
            "elements": 8,
            "mean_abs_dw": 1.5 / 8,
            "mean_dw_over_step": 1.5 / 8,
            "share_below_half_step": 1.0,
            "codes_changed": 0.0,
            "projection": 0.0,
        },
    )


def test_diagnostics_when_rounding_keeps_the_update():
    # B = [[0, 2, 2, 3], [3, 2, 0, 0]] is on A's grid: Q(B) - Q(A) = B - A, so the projection is 1.
    result = tensor_diagnostics(A, A + KEEP, RTN2)
    _check(
        result,
        {
            "elements": 8,
            "mean_abs_dw": 2 / 8,
            "mean_dw_over_step": 2 / 8,
            "share_below_half_step": 6 / 8,
            "codes_changed": 2 / 8,
            "projection": 1.0,
        },
    )


def test_diagnostics_in_between():
    # B = [0.375, 1.625, 2.375, 3] -> codes [0, 2, 2, 3]; Q(B) - Q(A) = [0, 1, 0, 0];
    # <Q(B)-Q(A), dW> = 0.625, ||dW||^2 = 0.375^2 + 0.625^2 + 0.375^2 = 0.671875: projection 40/43.
    result = tensor_diagnostics(A_ROW, A_ROW + BETWEEN, RTN2)
    _check(
        result,
        {
            "elements": 4,
            "mean_abs_dw": 1.375 / 4,
            "mean_dw_over_step": 1.375 / 4,
            "share_below_half_step": 3 / 4,
            "codes_changed": 1 / 4,
            "projection": 40 / 43,
        },
    )


def test_exactly_half_a_step_is_not_below_half_a_step():
    # B = [0, 1.5, 2, 3]: 1.5 rounds half to even, to code 2; |dW| = 0.5 is not < step / 2.
    # <Q(B)-Q(A), dW> = 0.5, ||dW||^2 = 0.25: projection 2.
    result = tensor_diagnostics(A_ROW, A_ROW + torch.tensor([[0.0, 0.5, 0.0, 0.0]]), RTN2)
    _check(result, {"share_below_half_step": 3 / 4, "codes_changed": 1 / 4, "projection": 2.0})


def test_diagnostics_compare_codes_each_on_its_own_grid():
    # B = 2A: scale 2 instead of 1, the same codes, and Q(B) = B exactly, so the update survives whole.
    result = tensor_diagnostics(A_ROW, 2 * A_ROW, RTN2)
    _check(
        result,
        {
            "mean_abs_dw": 1.5,
            "mean_dw_over_step": 1.5,  # |dW| = 0, 1, 2, 3 over A's step 1
            "share_below_half_step": 1 / 4,
            "codes_changed": 0.0,
            "projection": 1.0,
        },
    )


def test_diagnostics_use_the_step_of_each_elements_group():
    a = torch.tensor([[0.0, 3.0, 0.0, 6.0]])
    b = a + torch.tensor([[0.25, 0.0, 0.5, 0.0]])
    # groups of 2: steps 1 and 2, ratios 0.25, 0, 0.25, 0
    _check(tensor_diagnostics(a, b, QuantScheme(2, 2)), {"mean_dw_over_step": 0.125, "projection": 0.0})
    # one group per row: step 2 everywhere, ratios 0.125, 0, 0.25, 0
    _check(tensor_diagnostics(a, b, QuantScheme(2, None)), {"mean_dw_over_step": 0.09375})


def test_diagnostics_on_a_symmetric_grid():
    # 3-bit absmax on [-3, 3]: scale 1, codes -3, -1, 1, 3. B = [-3, -0.25, 0.75, 3] -> codes -3, 0, 1, 3.
    # <Q(B)-Q(A), dW> = 1 * 0.75, ||dW||^2 = 0.75^2 + 0.25^2 = 0.625: projection 1.2 (rounding overshoots).
    a = torch.tensor([[-3.0, -1.0, 1.0, 3.0]])
    b = a + torch.tensor([[0.0, 0.75, -0.25, 0.0]])
    _check(
        tensor_diagnostics(a, b, QuantScheme(3, None, symmetric=True)),
        {
            "mean_dw_over_step": 0.25,
            "share_below_half_step": 3 / 4,
            "codes_changed": 1 / 4,
            "projection": 1.2,
        },
    )


def test_diagnostics_of_identical_weights():
    result = tensor_diagnostics(A, A.clone(), RTN2)
    # every |dW| = 0 is below half a step, so that share is 1; all else is 0 and the projection undefined
    _check(
        result,
        {
            "mean_abs_dw": 0.0,
            "mean_dw_over_step": 0.0,
            "share_below_half_step": 1.0,
            "codes_changed": 0.0,
            "projection": None,
        },
    )
    report = weight_diagnostics({"w": A}, {"w": A.clone()}, ["w"], RTN2)
    assert report["total"]["projection"] is None
    assert report["total"]["mean_abs_dw"] == 0.0 and report["total"]["codes_changed"] == 0.0


def test_diagnostic_totals_are_weighted_by_element_count():
    a = {"big": A, "small": A_ROW, "ignored": A_ROW}
    b = {"big": A + KEEP, "small": A_ROW + BETWEEN, "ignored": A_ROW + 1.0}
    report = weight_diagnostics(a, b, ["big", "small"], RTN2)
    assert report["scheme"] == "rtn-w2-ch"
    assert set(report["per_tensor"]) == {"big", "small"}
    assert "_sums" not in report["per_tensor"]["big"]
    _check(report["per_tensor"]["small"], {"projection": 40 / 43, "codes_changed": 1 / 4})
    # 8 + 4 elements: |dW| sums 2 and 1.375, below half 6 and 3, codes changed 2 and 1,
    # projection (2 + 0.625) / (2 + 0.671875)
    _check(
        report["total"],
        {
            "elements": 12,
            "mean_abs_dw": 3.375 / 12,
            "mean_dw_over_step": 3.375 / 12,
            "share_below_half_step": 9 / 12,
            "codes_changed": 3 / 12,
            "projection": 2.625 / 2.671875,
        },
    )


# --------------------------------------------------------------------------------------------------
# CLI.


def test_cli_attack_writes_the_quantized_model_and_caches(trained_small, tmp_path, capsys):
    path, out = str(trained_small.path), tmp_path / "rtn"
    argv = ["attack", "--model", path, "--attack", "rtn-w4-g128", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "28 weight tensors changed" in printed
    assert f"kept in full precision: {LM_HEAD}, {EMBEDDINGS}" in printed
    original, _ = load_model(path)
    attacked, _ = load_model(out)
    scheme = QuantScheme(4, 128)
    attacked_params = dict(attacked.named_parameters())
    for name, p in original.named_parameters():
        if name in _decoder_linear_names():
            assert torch.equal(attacked_params[name], fake_quantize(p.detach(), scheme)), name
        else:
            assert torch.equal(attacked_params[name], p), name
    record = json.loads((out / "attack.json").read_text())
    assert record["attack"] == "rtn-w4-g128" and record["attack_kind"] == "quantization"
    assert main(argv) == 0
    assert "cached" in capsys.readouterr().out


def test_cli_attack_bad_name(trained_small, tmp_path, capsys):
    out = tmp_path / "bad"
    argv = ["attack", "--model", str(trained_small.path), "--attack", "quantum-4", "--out", str(out)]
    assert main(argv) == 2
    read_error_line(capsys, "quantum-4")
    assert not out.exists()


def test_cli_diff_matches_weight_diagnostics(trained_small, tmp_path, capsys):
    path, attacked, report_path = str(trained_small.path), tmp_path / "q", tmp_path / "diff.json"
    assert (
        main(["attack", "--model", path, "--attack", "rtn-w4-g128", "--out", str(attacked), "--quiet"]) == 0
    )
    argv = ["diff", "--a", path, "--b", str(attacked), "--attack", "rtn-w4-g128", "--json", str(report_path)]
    assert main(argv) == 0
    assert "total" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    names = sorted(_decoder_linear_names())
    assert sorted(report["per_tensor"]) == names
    state_a = load_model(path)[0].state_dict()
    state_b = load_model(attacked)[0].state_dict()
    direct = weight_diagnostics(state_a, state_b, names, QuantScheme(4, 128))
    assert report["scheme"] == direct["scheme"] == "rtn-w4-g128"
    assert report["total"].keys() == direct["total"].keys()
    for key, value in direct["total"].items():
        assert report["total"][key] == pytest.approx(value, rel=1e-9), key
    # B = Q(A): B - A is the rounding error itself, which quantizing again erases (RTN is idempotent)
    total = report["total"]
    assert total["elements"] == sum(state_a[n].numel() for n in names)
    assert total["codes_changed"] < 1e-5
    assert abs(total["projection"]) < 1e-3
    assert total["share_below_half_step"] > 0.999
    assert 0.2 < total["mean_dw_over_step"] < 0.3  # a rounding error is uniform on [0, 1/2) steps


@pytest.mark.parametrize("command", ["attack", "diff"])
def test_cli_group_size_that_does_not_divide_names_the_tensor(trained_small, tmp_path, capsys, command):
    path = str(trained_small.path)
    if command == "attack":
        argv = ["attack", "--model", path, "--attack", "rtn-w4-g100", "--out", str(tmp_path / "x"), "--quiet"]
    else:
        argv = ["diff", "--a", path, "--b", path, "--attack", "rtn-w4-g100"]
    assert main(argv) == 2
    line = read_error_line(capsys, "100")
    assert any(name in line for name in _decoder_linear_names())
    assert not (tmp_path / "x").exists()
