"""SURE: saliency, top-share selection and a mask that really holds under AdamW with weight decay.

Gradients are recomputed independently (a fresh copy of the tiny trained model, plain ``backward()``),
selections are recomputed by sorting, and training uses a real optimiser with the hooks called the way
the training loop calls them.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from relapse.data import load_benchmark
from relapse.data.batching import collate, tokenize_for_lm
from relapse.errors import ConfigError
from relapse.methods.losses import ga_loss
from relapse.methods.sure import build_mask, candidate_parameters, gradient_saliency, select_top
from relapse.models import load_model

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
TOP = {"module": 0.25, "neuron": 0.05}


def _forget_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return ga_loss(model(**inputs).logits, batch["labels"])


@pytest.fixture(scope="module")
def setup(trained_small, small_benchmark_dir):
    """Forget batches, the expected candidate names, and gradients computed independently of SURE."""
    model, tokenizer = load_model(trained_small.path)
    forget = load_benchmark(small_benchmark_dir).forget
    assert len(forget) >= 4
    batches = [
        collate(tokenize_for_lm(tokenizer, forget[i : i + 2], max_length=64), tokenizer.pad_token_id)
        for i in (0, 2)
    ]
    layers = model.config.num_hidden_layers
    names = [f"model.layers.{i}.{m}.weight" for i in range(layers) for m in LINEARS]
    # Independent reference: every parameter trainable, plain backward over both batches (grads add up).
    for batch in batches:
        _forget_loss(model, batch).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return {"path": trained_small.path, "batches": batches, "names": names, "grads": grads}


def _fresh(setup) -> torch.nn.Module:
    model, _ = load_model(setup["path"])
    return model


def _independent_keep(setup, granularity: str, top: float) -> dict[str, torch.Tensor]:
    """Top share by sorting the independent norms (with their position as the tie-breaker)."""
    names, grads = setup["names"], setup["grads"]
    entries = []
    for name in names:
        if granularity == "module":
            entries.append((float(grads[name].norm()), name, None))
        else:
            for row, value in enumerate(grads[name].norm(dim=1).tolist()):
                entries.append((value, name, row))
    count = math.ceil(top * len(entries))
    chosen = sorted(entries, key=lambda e: -e[0])[:count]
    # The selection must not hinge on float noise: a clear gap at the threshold.
    threshold_gap = chosen[-1][0] - sorted(entries, key=lambda e: -e[0])[count][0]
    assert threshold_gap > 1e-4 * chosen[-1][0]
    if granularity == "module":
        picked = {name for _, name, _ in chosen}
        return {name: torch.tensor(name in picked) for name in names}
    keep = {name: torch.zeros(grads[name].shape[0], dtype=torch.bool) for name in names}
    for _, name, row in chosen:
        keep[name][row] = True
    return keep


def _may_move(param: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Boolean tensor shaped like ``param``: the elements the mask allows to change."""
    if keep is None:
        return torch.zeros_like(param, dtype=torch.bool)
    if keep.dim() == 0:
        return torch.full_like(param, bool(keep), dtype=torch.bool)
    return keep.unsqueeze(1).expand_as(param)


def _train(model: torch.nn.Module, mask, batch, steps: int = 3, hooks: bool = True) -> None:
    """A few AdamW steps with weight decay, hooks placed as in ``relapse.training.loop``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        _forget_loss(model, batch).backward()
        if hooks:
            mask.after_backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if hooks:
            mask.after_step()


# --- select_top ---------------------------------------------------------------------------------------

MIXED = {
    "a": torch.tensor(3.0),
    "b": torch.tensor([1.0, 5.0, 2.0]),
    "c": torch.tensor(0.5),
    "d": torch.tensor([4.0, 0.1]),
    "e": torch.tensor(2.5),
}


@pytest.mark.parametrize("top", [0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_select_top_keeps_exactly_the_largest_entries_of_mixed_scalars_and_vectors(top):
    entries = [(float(v), n, None) for n, v in MIXED.items() if v.dim() == 0]
    entries += [(x, n, i) for n, v in MIXED.items() if v.dim() == 1 for i, x in enumerate(v.tolist())]
    count = math.ceil(top * len(entries))
    expected = {(n, i) for _, n, i in sorted(entries, reverse=True)[:count]}
    masks = select_top(MIXED, top)
    assert set(masks) == set(MIXED)
    got = set()
    for name, keep in masks.items():
        assert keep.dtype == torch.bool
        assert keep.shape == MIXED[name].shape
        if keep.dim() == 0:
            if bool(keep):
                got.add((name, None))
        else:
            got.update((name, i) for i, k in enumerate(keep.tolist()) if k)
    assert len(got) == count
    assert got == expected


def test_select_top_on_many_random_entries():
    generator = torch.Generator().manual_seed(3)
    saliency = {f"w{i}": torch.rand(7, generator=generator) for i in range(6)}
    saliency["scalar"] = torch.tensor(0.99)
    masks = select_top(saliency, 0.2)
    flat_values = torch.cat([saliency[n].reshape(-1) for n in saliency])
    flat_keep = torch.cat([masks[n].reshape(-1) for n in saliency])
    count = math.ceil(0.2 * 43)
    assert int(flat_keep.sum()) == count
    assert float(flat_values[flat_keep].min()) > float(flat_values[~flat_keep].max())
    assert bool(masks["scalar"])


def test_select_top_breaks_ties_by_order():
    saliency = {"x": torch.tensor([1.0, 1.0]), "y": torch.tensor(1.0), "z": torch.tensor([1.0])}
    masks = select_top(saliency, 0.5)
    assert masks["x"].tolist() == [True, True]
    assert not bool(masks["y"])
    assert masks["z"].tolist() == [False]


def test_select_top_count_is_not_inflated_by_float_rounding():
    saliency = {"rows": torch.arange(100, dtype=torch.float32)}
    for top in (0.07, 0.14, 0.29, 0.57):
        exact = math.ceil(Fraction(str(top)) * 100)
        assert int(select_top(saliency, top)["rows"].sum()) == exact


@pytest.mark.parametrize("top", [0.0, -0.5, 1.0001, 2.0, float("nan")])
def test_select_top_rejects_top_outside_zero_one(top):
    with pytest.raises(ConfigError):
        select_top(MIXED, top)


# --- candidates and saliency -------------------------------------------------------------------------


def test_candidate_parameters_are_the_decoder_linear_weights(setup):
    model = _fresh(setup)
    found = candidate_parameters(model)
    assert sorted(found) == sorted(setup["names"])
    assert len(found) == 7 * model.config.num_hidden_layers
    params = dict(model.named_parameters())
    for name, p in found.items():
        assert p is params[name]
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in found)
    assert all(p is not model.get_input_embeddings().weight for p in found.values())
    assert all(p is not model.get_output_embeddings().weight for p in found.values())


def test_module_saliency_is_the_frobenius_norm_of_the_forget_gradient(setup):
    model = _fresh(setup)
    saliency = gradient_saliency(model, _forget_loss, setup["batches"], "module")
    assert sorted(saliency) == sorted(setup["names"])
    for name, value in saliency.items():
        assert value.dim() == 0
        expected = float(setup["grads"][name].norm())
        assert expected > 0
        assert float(value) == pytest.approx(expected, rel=1e-4)
    # Not a constant: the norms really differ between tensors.
    values = [float(v) for v in saliency.values()]
    assert max(values) > 2 * min(values)


def test_neuron_saliency_is_the_row_norms_of_the_forget_gradient(setup):
    model = _fresh(setup)
    saliency = gradient_saliency(model, _forget_loss, setup["batches"], "neuron")
    assert sorted(saliency) == sorted(setup["names"])
    for name, value in saliency.items():
        grad = setup["grads"][name]
        assert value.shape == (grad.shape[0],)
        torch.testing.assert_close(value, grad.norm(dim=1), rtol=1e-4, atol=1e-9)


def test_saliency_sums_gradients_over_batches(setup):
    model = _fresh(setup)
    one = gradient_saliency(model, _forget_loss, setup["batches"][:1], "module")
    both = gradient_saliency(model, _forget_loss, setup["batches"], "module")
    name = setup["names"][0]
    assert float(both[name]) == pytest.approx(float(setup["grads"][name].norm()), rel=1e-4)
    assert abs(float(one[name]) - float(both[name])) > 1e-3 * float(both[name])


def test_saliency_leaves_flags_grads_and_weights_as_they_were(setup):
    model = _fresh(setup)
    model.get_input_embeddings().weight.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    model.model.norm.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    saliency = gradient_saliency(model, _forget_loss, setup["batches"], "module")
    # A candidate that was frozen before still gets its saliency.
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert float(saliency[q0]) == pytest.approx(float(setup["grads"][q0].norm()), rel=1e-4)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_saliency_restores_existing_grads(setup):
    model = _fresh(setup)
    params = dict(model.named_parameters())
    before = {n: torch.full_like(params[n], 0.5) for n in (setup["names"][0], "model.embed_tokens.weight")}
    for name, grad in before.items():
        params[name].grad = grad.clone()
    saliency = gradient_saliency(model, _forget_loss, setup["batches"], "module")
    name = setup["names"][0]
    assert float(saliency[name]) == pytest.approx(float(setup["grads"][name].norm()), rel=1e-4)
    for name, grad in before.items():
        assert params[name].grad is not None
        assert torch.equal(params[name].grad, grad)


def test_saliency_rejects_unknown_granularity(setup):
    with pytest.raises(ConfigError):
        gradient_saliency(_fresh(setup), _forget_loss, setup["batches"], "layer")


# --- the mask ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["module", "neuron"])
def test_selected_tensors_have_the_largest_gradient_norms(setup, granularity):
    model = _fresh(setup)
    mask = build_mask(model, _forget_loss, setup["batches"], TOP[granularity], granularity)
    expected = _independent_keep(setup, granularity, TOP[granularity])
    assert sorted(mask.keep) == sorted(expected)
    for name, keep in expected.items():
        assert torch.equal(mask.keep[name], keep), name


@pytest.mark.parametrize("granularity", ["module", "neuron"])
def test_mask_holds_under_adamw_with_weight_decay(setup, granularity):
    model = _fresh(setup)
    mask = build_mask(model, _forget_loss, setup["batches"], TOP[granularity], granularity)
    mask.attach(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    allowed = {n: _may_move(p, mask.keep.get(n)) for n, p in model.named_parameters()}
    if granularity == "neuron":  # the interesting case: tensors that are only partly frozen
        partly = [n for n, k in mask.keep.items() if k.any() and not k.all()]
        assert partly
    assert any(a.any() for a in allowed.values())
    assert any(not a.any() for a in allowed.values())

    _train(model, mask, setup["batches"][0])

    for name, p in model.named_parameters():
        frozen = ~allowed[name]
        assert torch.equal(p.detach()[frozen], before[name][frozen]), f"{name} moved outside the mask"
        keep = mask.keep.get(name)
        if keep is None or not keep.any():
            continue
        if keep.dim() == 0:
            assert not torch.equal(p.detach(), before[name]), f"selected {name} did not change"
        else:
            rows_changed = (p.detach() != before[name]).any(dim=1)
            assert bool(rows_changed[keep].all()), f"a selected row of {name} did not change"
    result = mask.verify()
    assert result["frozen_elements_identical"] is True
    assert result["changed_tensors"] == []


def test_after_backward_zeroes_exactly_the_frozen_rows_gradients(setup):
    model = _fresh(setup)
    mask = build_mask(model, _forget_loss, setup["batches"], TOP["neuron"], "neuron")
    mask.attach(model)
    _forget_loss(model, setup["batches"][0]).backward()
    params = dict(model.named_parameters())
    raw = {n: params[n].grad.clone() for n, k in mask.keep.items() if k.any()}
    mask.after_backward()
    assert raw
    for name, grad in raw.items():
        keep = mask.keep[name]
        after = params[name].grad
        assert torch.equal(after[keep], grad[keep])
        assert bool((after[~keep] == 0).all())
        if not keep.all():
            assert bool((grad[~keep] != 0).any())  # there was something to zero


def test_without_the_hooks_weight_decay_moves_frozen_rows_and_verify_sees_it(setup):
    model = _fresh(setup)
    mask = build_mask(model, _forget_loss, setup["batches"], TOP["neuron"], "neuron")
    mask.attach(model)
    partly = sorted(n for n, k in mask.keep.items() if k.any() and not k.all())
    _train(model, mask, setup["batches"][0], hooks=False)
    result = mask.verify()
    assert not result["frozen_elements_identical"]
    assert sorted(result["changed_tensors"]) == partly


@pytest.mark.parametrize("granularity", ["module", "neuron"])
def test_verify_reports_a_deliberately_changed_frozen_element(setup, granularity):
    model = _fresh(setup)
    mask = build_mask(model, _forget_loss, setup["batches"], TOP[granularity], granularity)
    mask.attach(model)
    _train(model, mask, setup["batches"][0], steps=1)
    assert mask.verify()["frozen_elements_identical"]
    params = dict(model.named_parameters())
    if granularity == "module":
        frozen_name = next(n for n, k in mask.keep.items() if not k)
        frozen_index = (0, 0)
        moving_name = next(n for n, k in mask.keep.items() if k)
        moving_index = (0, 0)
    else:
        frozen_name = next(n for n, k in mask.keep.items() if k.any() and not k.all())
        frozen_index = (int((~mask.keep[frozen_name]).nonzero()[0]), 3)
        moving_name = frozen_name
        moving_index = (int(mask.keep[frozen_name].nonzero()[0]), 3)

    with torch.no_grad():
        params[moving_name][moving_index] += 1.0  # allowed to move: not a violation
    assert mask.verify()["frozen_elements_identical"]

    with torch.no_grad():
        original = params[frozen_name][frozen_index].clone()
        params[frozen_name][frozen_index] += 1e-3
    result = mask.verify()
    assert not result["frozen_elements_identical"]
    assert result["changed_tensors"] == [frozen_name]

    with torch.no_grad():
        params[frozen_name][frozen_index] = original
        params["model.embed_tokens.weight"][5, 5] += 1e-3  # never a candidate
    assert mask.verify()["changed_tensors"] == ["model.embed_tokens.weight"]


@pytest.mark.parametrize("granularity", ["module", "neuron"])
def test_summary_counts_the_elements_that_may_move(setup, granularity):
    model = _fresh(setup)
    mask = build_mask(model, _forget_loss, setup["batches"], TOP[granularity], granularity)
    mask.attach(model)
    expected_keep = _independent_keep(setup, granularity, TOP[granularity])
    params = dict(model.named_parameters())
    may_move = sum(int(_may_move(params[n], k).sum()) for n, k in expected_keep.items())
    total = sum(p.numel() for p in model.parameters())
    summary = mask.summary()
    assert summary["granularity"] == granularity
    assert summary["top"] == TOP[granularity]
    assert summary["candidates"] == len(setup["names"])
    assert summary["trainable_elements"] == may_move
    assert summary["total_elements"] == total
    assert summary["trainable_share"] == pytest.approx(may_move / total)
    assert 0 < may_move < total
    selected = {entry["name"] for entry in summary["selected"]}
    assert selected == {n for n, k in expected_keep.items() if k.any()}
    if granularity == "module":
        assert may_move == sum(p.numel() for p in model.parameters() if p.requires_grad)
        for entry in summary["selected"]:
            expected = float(setup["grads"][entry["name"]].norm())
            assert entry["saliency"] == pytest.approx(expected, rel=1e-4)
    else:
        for entry in summary["selected"]:
            assert entry["rows"] == int(expected_keep[entry["name"]].sum())
            assert entry["of_rows"] == params[entry["name"]].shape[0]
