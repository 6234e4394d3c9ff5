"""The quantization-robust objective: the loss on rounded weights, with straight-through gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from relapse.attacks.base import AttackContext, applied
from relapse.attacks.registry import get_attack
from relapse.data import load_benchmark, synth_benchmark
from relapse.data.batching import collate, tokenize_for_lm
from relapse.data.prompts import qa_text
from relapse.errors import ConfigError
from relapse.methods.robust import DEFAULT_GRIDS, RobustObjective, check_grids, resolve_grids
from relapse.methods.unlearn import UnlearnConfig, unlearn_model
from relapse.metrics.qa import qa_recall
from relapse.models import load_model
from relapse.models.tiny import TinyConfig, build_tiny
from relapse.runtime import RunContext


def _batch(tokenizer, benchmark, split="forget"):
    texts = benchmark.texts(split) + [qa_text(p) for p in benchmark.qa(split)]
    return collate(tokenize_for_lm(tokenizer, texts, 256), tokenizer.pad_token_id)


def _mean_nll(model, batch) -> torch.Tensor:
    """Mean token NLL of the batch, written out here rather than taken from relapse's losses."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    counted = labels != -100
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * counted).sum() / counted.sum()


def test_rounded_view_computes_on_rounded_weights_and_passes_gradients_straight_through(
    trained_small, small_benchmark_dir
):
    model, tokenizer = load_model(trained_small.path)
    batch = _batch(tokenizer, load_benchmark(small_benchmark_dir))
    robust = RobustObjective(model, ["rtn-w4-g64"], trained_small.path)
    # The reference: a copy whose weights really are rounded, differentiated as usual.
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        attack = get_attack("rtn-w4-g64")
        for name, p in attack.touched(rounded, AttackContext()).items():
            p.copy_(attack.round_weight(p, name))
    expected = _mean_nll(rounded, batch)
    expected.backward()
    got = _mean_nll(robust.view(model, step=0), batch)
    got.backward()
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    reference_grads = dict(rounded.named_parameters())
    for name, p in model.named_parameters():
        # Straight-through: d/dw of L(Q(w)) is taken as dL/dQ at Q(w), for rounded and kept weights alike.
        assert torch.allclose(p.grad, reference_grads[name].grad, atol=1e-6), name
    assert robust.names and all("layers" in n for n in robust.names)  # the decoder's linear layers


def test_grids_take_turns_by_step(trained_small):
    model, _ = load_model(trained_small.path)
    robust = RobustObjective(model, ["rtn-w4-ch", "rtn-w4-g64", "rtn-w8-ch"], trained_small.path)
    assert [robust.grid_at(s) for s in range(5)] == [
        "rtn-w4-ch",
        "rtn-w4-g64",
        "rtn-w8-ch",
        "rtn-w4-ch",
        "rtn-w4-g64",
    ]


@pytest.mark.parametrize("name", ["relearn-retain-25", "noise-like-rtn-w4-g128", "prune-30", "gptq-w4-g128"])
def test_only_rounding_grids_are_accepted(name):
    with pytest.raises(ConfigError, match="round weights"):
        check_grids([name])
    with pytest.raises(ConfigError, match="round weights"):
        UnlearnConfig(robust_to=[name])


def test_default_grids_expand_and_duplicates_drop(tmp_path):
    grids = resolve_grids(["rtn-w4-ch", "default"], tmp_path)  # a folder with no provenance: no base grid
    assert grids[0] == "rtn-w4-ch" and len(grids) == len(set(grids))
    assert set(grids) <= set(DEFAULT_GRIDS)
    assert {"rtn-w4-ch", "rtn-w4-g64", "rtn-w4-g128"} <= set(grids)


def test_robust_to_is_refused_with_lora_and_when_empty():
    with pytest.raises(ConfigError, match="lora"):
        UnlearnConfig(robust_to=["rtn-w4-g64"], lora_r=4)
    with pytest.raises(ConfigError, match="at least one grid"):
        UnlearnConfig(robust_to=[])


def test_first_step_minimises_the_float_plus_the_rounded_loss(trained_small, small_benchmark_dir, tmp_path):
    # One batch holds every forget example, so the first step's loss is GA on all of them, in float
    # and after rounding: -(NLL(w) + NLL(Q(w))), computed here without relapse's losses.
    config = UnlearnConfig(
        method="ga", robust_to=["rtn-w4-g64"], batch_size=256, max_steps=2, eval_every=100, lr=1e-4
    )
    result = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "u", config, run=RunContext(progress=False)
    )
    model, tokenizer = load_model(trained_small.path)
    batch = _batch(tokenizer, load_benchmark(small_benchmark_dir))
    with torch.no_grad():
        float_nll = float(_mean_nll(model, batch))
        with applied(get_attack("rtn-w4-g64"), model, AttackContext()):
            rounded_nll = float(_mean_nll(model, batch))
    assert result.record["loss_curve"][0] == pytest.approx(-(float_nll + rounded_nll), abs=1e-4)
    assert rounded_nll != pytest.approx(float_nll, abs=1e-6)  # the grid changes the loss at all
    assert result.record["robust"]["grids"] == ["rtn-w4-g64"]
    # Without the robust term the same run minimises the float loss alone.
    plain = unlearn_model(
        trained_small.path,
        small_benchmark_dir,
        tmp_path / "plain",
        UnlearnConfig(method="ga", batch_size=256, max_steps=2, eval_every=100, lr=1e-4),
        run=RunContext(progress=False),
    )
    assert plain.record["loss_curve"][0] == pytest.approx(-float_nll, abs=1e-4)


def test_variant_muse_compatible_needs_a_term_that_has_it():
    with pytest.raises(ConfigError, match="npo and klr only"):
        UnlearnConfig(method="simnpo+gdr", variant="muse-compatible")
    UnlearnConfig(method="npo+gdr", variant="muse-compatible")  # npo has it


def test_the_stop_rule_waits_for_the_rounded_model_to_forget(trained_small, small_benchmark_dir, tmp_path):
    config = UnlearnConfig(
        method="ga+gdr",
        robust_to=["rtn-w4-g64"],
        stop_forget_recall=0.3,
        lr=3e-4,
        batch_size=8,
        max_steps=40,
        eval_every=2,
    )
    result = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "u", config, run=RunContext(progress=False)
    )
    history = result.record["history"]
    assert result.record["stopped_early"]
    last = history[-1]
    assert max(last["recall_forget"], last["recall_forget_rounded"]) <= 0.3
    assert all(max(h["recall_forget"], h["recall_forget_rounded"]) > 0.3 for h in history[:-1])
    # The rounded recall is the saved model's, rounded by the grid and measured here.
    model, tokenizer = load_model(result.path)
    pairs = load_benchmark(small_benchmark_dir).forget_qa
    with applied(get_attack("rtn-w4-g64"), model, AttackContext()):
        assert qa_recall(model, tokenizer, pairs)["value"] == last["recall_forget_rounded"]


def test_a_grid_the_model_cannot_take_is_refused_when_named_and_left_out_of_default(tmp_path):
    # Rows of 96 weights: groups of 64 and 128 do not divide them (SmolLM2's 576 and groups of 128 alike).
    benchmark = synth_benchmark(people=4, facts_per_person=2, seed=0)
    model, _ = build_tiny(TinyConfig(hidden_size=96, num_heads=4, intermediate_size=192), benchmark)
    with pytest.raises(ConfigError, match="rtn-w4-g64 cannot round this model"):
        RobustObjective(model, ["rtn-w4-ch", "rtn-w4-g64"], tmp_path)
    robust = RobustObjective(model, ["default"], tmp_path)
    assert {"rtn-w4-g64", "rtn-w4-g128"} <= set(robust.describe()["left_out"])
    assert "rtn-w4-ch" in robust.grids and not {"rtn-w4-g64", "rtn-w4-g128"} & set(robust.grids)


# --- the margin term -----------------------------------------------------------------------------------


def test_margin_is_the_distance_to_the_cell_edge_in_steps_for_moved_weights_only(tmp_path):
    """One weight moved a quarter step: the hinge is how far it still is from the edge of the target's
    rounding cell (plus 0.05) in the direction it moved, by hand; its gradient pushes on along that
    direction; a weight past the edge, or one that did not move, adds nothing."""
    from relapse.attacks.rtn import parse_rtn_name, quantize

    benchmark = synth_benchmark(people=4, facts_per_person=2, seed=0)
    model, _ = build_tiny(TinyConfig(hidden_size=64, num_heads=4, intermediate_size=128), benchmark)
    robust = RobustObjective(model, ["rtn-w4-ch", "bnb-nf4"], tmp_path, margin=True)
    name = "model.layers.0.mlp.down_proj.weight"
    weight = dict(model.named_parameters())[name]
    grid = quantize(weight.detach(), parse_rtn_name("rtn-w4-ch"))
    step, centre = float(grid.step()[3, 5]), float(grid.dequantize()[3, 5])
    start = float(weight[3, 5].detach())
    with torch.no_grad():
        weight[3, 5] = start - 0.25 * step  # moved down a quarter step
    loss = robust.margin_loss(model, step=0)
    reach = -(start - 0.25 * step - centre) / step  # past the centre, downwards, in steps
    assert float(loss.detach()) == pytest.approx(max(0.0, 0.55 - reach), rel=1e-5)
    loss.backward()
    gradient = weight.grad
    assert float(gradient[3, 5]) == pytest.approx(1.0 / step, rel=1e-5)  # descent moves it further down
    assert int((gradient != 0).sum()) == 1
    with torch.no_grad():
        weight[3, 5] = centre - 0.6 * step  # past the lower edge (and 0.05 beyond): done
    assert float(robust.margin_loss(model, step=0)) == 0.0
    assert robust.margin_loss(model, step=1) is None  # NF4's cells are not uniform: no margin there


def test_robust_margin_needs_robust_to_and_a_sane_weight():
    with pytest.raises(ConfigError, match="--robust-margin adds to --robust-to"):
        UnlearnConfig(robust_margin=1.0)
    with pytest.raises(ConfigError, match="--robust-margin must be finite"):
        UnlearnConfig(robust_to=["rtn-w4-ch"], robust_margin=float("nan"))
    assert UnlearnConfig(robust_to=["rtn-w4-ch"], robust_margin=0.5).robust_margin == 0.5
