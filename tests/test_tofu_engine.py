"""TOFU's metrics in the engine (``relapse eval --metrics tofu``, the audit's ``tofu_*`` metrics).

Each engine value is checked against an independent computation: a plain loop over the examples that runs
the model on one text at a time (no batching, no padding), takes the answer tokens' log-probabilities and
argmax predictions itself, and applies the formulas by hand or with scipy (``ks_2samp``, ``hmean``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from scipy import stats

from relapse.data import load_benchmark
from relapse.data.benchmark import QAPair
from relapse.data.prompts import KNOWMEM_STOP_STRINGS, qa_prompt, qa_text
from relapse.errors import ConfigError, DataError
from relapse.metrics import tofu
from relapse.metrics.catalog import metric_info, primary_choices, tofu_utility_parts
from relapse.metrics.engine import GROUPS, EvalSettings, Evaluator, forget_truth_ratios, resolve_metrics
from relapse.metrics.generation import greedy_generate
from relapse.metrics.rouge import rouge_l
from relapse.models import load_model
from relapse.models.tiny import TinyConfig, build_tiny

TOFU = list(GROUPS["tofu"])


@pytest.fixture(scope="module")
def small_benchmark(small_benchmark_dir):
    return load_benchmark(small_benchmark_dir)


@pytest.fixture(scope="module")
def trained(trained_small):
    return load_model(trained_small.path)


@pytest.fixture(scope="module")
def untrained(small_benchmark):
    """A model that never saw the benchmark: the stand-in for a retrained one on the forget set."""
    config = TinyConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    model, tokenizer = build_tiny(config, small_benchmark, seed=0)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def mixed(small_benchmark):
    """Known (forget) and unknown (holdout) questions on the forget side, so values are not all alike."""
    return dataclasses.replace(
        small_benchmark,
        forget_qa=small_benchmark.forget_qa[:4] + small_benchmark.holdout_qa[:4],
        retain_qa=small_benchmark.retain_qa[:6],
    )


# the independent computation -------------------------------------------------------------------------
def _answer_logits(model, tokenizer, question: str, answer: str):
    """One QA text through the model alone: (logits of the whole text, labels with -100 outside the
    answer, the answer tokens' log-probabilities in float64)."""
    prompt_ids = tokenizer(qa_prompt(question))["input_ids"]
    ids = tokenizer(qa_text(QAPair(question, answer)))["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # the word tokenizer never merges across " answer"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    labels = torch.full((1, len(ids)), tofu.IGNORE_INDEX)
    labels[0, len(prompt_ids) :] = torch.tensor(ids[len(prompt_ids) :])
    log_probs = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    picked = log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return logits, labels, picked[len(prompt_ids) - 1 :].numpy()


def _nll(model, tokenizer, question: str, answer: str) -> float:
    return float(-_answer_logits(model, tokenizer, question, answer)[2].mean())


def _reference_ratios(model, tokenizer, pairs) -> np.ndarray:
    """Truth ratios as the original TOFU code writes them, the other way up: P(wrong) / P(paraphrase)."""
    out = []
    for pair in pairs:
        para = _nll(model, tokenizer, pair.question, pair.paraphrased_answer)
        wrong = np.mean([_nll(model, tokenizer, pair.question, w) for w in pair.perturbed_answers])
        out.append(np.exp(-wrong) / np.exp(-para))
    return np.array(out)


# values ---------------------------------------------------------------------------------------------
def test_probabilities_and_truth_ratios_match_a_per_example_loop(trained, mixed):
    model, tokenizer = trained
    results = Evaluator(model, tokenizer, mixed, EvalSettings(batch_size=5)).run(
        ["tofu_prob_forget", "tofu_prob_retain", "tofu_truth_ratio_forget", "tofu_truth_ratio_retain"]
    )
    for split in ("forget", "retain"):
        pairs = getattr(mixed, f"{split}_qa")
        probs = [np.exp(-_nll(model, tokenizer, p.question, p.answer)) for p in pairs]
        result = results[f"tofu_prob_{split}"]
        assert result["item_values"] == pytest.approx(probs, rel=1e-4, abs=1e-7)
        assert result["value"] == pytest.approx(np.mean(probs), rel=1e-4)
        ratios = _reference_ratios(model, tokenizer, pairs)
        got = results[f"tofu_truth_ratio_{split}"]
        assert [it["truth_ratio"] for it in got["per_item"]] == pytest.approx(ratios, rel=1e-4)
        if split == "forget":
            expected = np.mean([min(r, 1 / r) for r in ratios])
        else:
            expected = np.mean([max(0.0, 1 - r) for r in ratios])
        assert got["value"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert got["value"] == pytest.approx(np.mean(got["item_values"]), rel=1e-9, abs=1e-12)
    forget_probs = results["tofu_prob_forget"]["item_values"]
    assert max(forget_probs[:4]) > 0.5 > min(forget_probs[4:])  # trained on the first 4, not the last 4
    assert results["tofu_prob_forget"]["higher_is_better"] is False
    assert results["tofu_truth_ratio_forget"]["higher_is_better"] is True


def test_exact_memorisation_and_extraction_strength_match_tofu_py_on_the_models_logits(trained, mixed):
    model, tokenizer = trained
    results = Evaluator(model, tokenizer, mixed, EvalSettings(batch_size=3)).run(
        ["tofu_exact_mem_forget", "tofu_extraction_forget"]
    )
    em, es = [], []
    for pair in mixed.forget_qa:
        logits, labels, _ = _answer_logits(model, tokenizer, pair.question, pair.answer)
        # no EOS is scored, so no last label to drop (open-unlearning drops its EOS label)
        em.append(float(tofu.exact_memorization(logits, labels, drop_last=False)[0]))
        es.append(float(tofu.extraction_strength(logits, labels, drop_last=False)[0]))
    assert results["tofu_exact_mem_forget"]["item_values"] == pytest.approx(em)
    assert results["tofu_extraction_forget"]["item_values"] == pytest.approx(es)
    assert results["tofu_exact_mem_forget"]["value"] == pytest.approx(np.mean(em))
    assert results["tofu_extraction_forget"]["value"] == pytest.approx(np.mean(es))
    assert len(set(em)) > 1  # memorised and unseen answers differ


def test_forget_quality_is_scipys_ks_p_value_against_the_retrained_ratios(trained, untrained, mixed):
    model, tokenizer = trained
    other, other_tokenizer = untrained
    reference = forget_truth_ratios(Evaluator(other, other_tokenizer, mixed, EvalSettings(batch_size=4)))
    assert reference == pytest.approx(_reference_ratios(other, other_tokenizer, mixed.forget_qa), rel=1e-4)
    settings = EvalSettings(batch_size=4, retrained_truth_ratios=reference)
    result = Evaluator(model, tokenizer, mixed, settings).compute("tofu_forget_quality")
    own = _reference_ratios(model, tokenizer, mixed.forget_qa)
    expected = stats.ks_2samp(own, reference)
    assert result["value"] == pytest.approx(expected.pvalue, rel=1e-6)
    assert result["views"]["ks_statistic"] == pytest.approx(expected.statistic)
    assert result["truth_ratios"] == pytest.approx(own, rel=1e-4)
    assert result["value"] < 1.0


def test_forget_quality_of_the_retrained_model_against_itself_is_one(untrained, mixed):
    model, tokenizer = untrained
    settings = EvalSettings(batch_size=4)
    settings.retrained_truth_ratios = forget_truth_ratios(Evaluator(model, tokenizer, mixed, settings))
    result = Evaluator(model, tokenizer, mixed, settings).compute("tofu_forget_quality")
    assert result["value"] == 1.0
    assert result["views"]["ks_statistic"] == 0.0


def test_rouge_and_model_utility_match_an_independent_computation(trained, mixed):
    model, tokenizer = trained
    results = Evaluator(model, tokenizer, mixed, EvalSettings(batch_size=4)).run(
        ["tofu_rouge_retain", "tofu_model_utility", "tofu_prob_retain", "tofu_truth_ratio_retain"]
    )
    rouge = results["tofu_rouge_retain"]
    for item, pair in zip(rouge["per_item"], mixed.retain_qa, strict=True):
        assert item["rougeL_recall"] == pytest.approx(rouge_l(pair.answer, item["generated"])[1])
    assert rouge["value"] == pytest.approx(np.mean([it["rougeL_recall"] for it in rouge["per_item"]]))
    assert rouge["value"] > 0.5  # a trained model answers its retain questions
    parts = [
        results[n]["value"] for n in ("tofu_prob_retain", "tofu_rouge_retain", "tofu_truth_ratio_retain")
    ]
    utility = results["tofu_model_utility"]
    assert utility["value"] == pytest.approx(stats.hmean(parts))
    # no utility QA set: the retain set's three values, and the result says so
    assert utility["views"] == {
        "components": 3,
        "tofu_prob_retain": parts[0],
        "tofu_rouge_retain": parts[1],
        "tofu_truth_ratio_retain": parts[2],
    }
    assert utility["higher_is_better"] is True


# utility QA sets (TOFU's real authors and world facts) --------------------------------------------------
@pytest.fixture(scope="module")
def with_utility_sets(small_benchmark_dir, tmp_path_factory):
    """The small benchmark's folder plus two utility QA sets written as files: "real_authors" asks retain
    questions (known to the trained model), "world_facts" holdout ones (unknown) and retain ones, so that
    no component is 0 (which would make the harmonic mean 0 whatever the others). Each record keeps its
    paraphrase, which these sets must not use, and has 4, 3, 2, ... perturbed answers (ragged)."""
    root = tmp_path_factory.mktemp("utility") / "bench"
    shutil.copytree(small_benchmark_dir, root)
    source = load_benchmark(small_benchmark_dir)
    sets = {
        "real_authors": source.retain_qa[6:11],
        "world_facts": source.holdout_qa[:3] + source.retain_qa[11:13],
    }
    for name, pairs in sets.items():
        records = [
            {**pair.to_json(), "perturbed_answer": list(pair.perturbed_answers[: 4 - i % 3])}
            for i, pair in enumerate(pairs)
        ]
        assert all(r["paraphrased_answer"] != r["answer"] for r in records)
        path = root / f"utility_{name}_qa.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    benchmark = load_benchmark(root)
    assert list(benchmark.utility_qa) == ["real_authors", "world_facts"]
    return dataclasses.replace(benchmark, retain_qa=benchmark.retain_qa[:6])


def _set_values(model, tokenizer, pairs) -> dict[str, list[float]]:
    """Per pair, by hand from one-text-at-a-time NLLs: the normalised probability p_a / (p_a + sum_k p_k)
    and the truth ratio exp(-mean_k NLL_k) / p_a, with p = exp(-NLL) and the ORIGINAL answer as a."""
    normalised, ratios = [], []
    for pair in pairs:
        answer = _nll(model, tokenizer, pair.question, pair.answer)
        wrong = [_nll(model, tokenizer, pair.question, w) for w in pair.perturbed_answers]
        normalised.append(np.exp(-answer) / (np.exp(-answer) + sum(np.exp(-w) for w in wrong)))
        ratios.append(np.exp(-np.mean(wrong)) / np.exp(-answer))
    return {"normalised": normalised, "ratios": ratios}


def test_utility_set_metrics_match_a_per_example_loop(trained, with_utility_sets):
    model, tokenizer = trained
    sets = with_utility_sets.utility_qa
    names = [f"tofu_{m}_{s}" for s in sets for m in ("prob", "rouge", "truth_ratio")]
    results = Evaluator(model, tokenizer, with_utility_sets, EvalSettings(batch_size=3)).run(names)
    for name, pairs in sets.items():
        expected = _set_values(model, tokenizer, pairs)
        prob = results[f"tofu_prob_{name}"]
        assert prob["item_values"] == pytest.approx(expected["normalised"], rel=1e-4)
        assert prob["value"] == pytest.approx(np.mean(expected["normalised"]), rel=1e-4)
        raw = [np.exp(-_nll(model, tokenizer, p.question, p.answer)) for p in pairs]
        assert prob["views"]["probability"] == pytest.approx(np.mean(raw), rel=1e-4)
        ratio = results[f"tofu_truth_ratio_{name}"]
        assert ratio["truth_ratios"] == pytest.approx(expected["ratios"], rel=1e-4)
        assert ratio["value"] == pytest.approx(
            np.mean([max(0.0, 1 - r) for r in expected["ratios"]]), abs=1e-6
        )
        rouge = results[f"tofu_rouge_{name}"]
        for item, pair in zip(rouge["per_item"], pairs, strict=True):
            alone = greedy_generate(
                model, tokenizer, [qa_prompt(pair.question)], 200, 1, KNOWMEM_STOP_STRINGS
            )
            assert item["generated"] == alone[0].strip()
            assert item["rougeL_recall"] == pytest.approx(rouge_l(pair.answer, alone[0])[1])
        assert rouge["value"] == pytest.approx(np.mean([it["rougeL_recall"] for it in rouge["per_item"]]))
        for result in (prob, ratio, rouge):
            assert result["higher_is_better"] is True
    # the trained model knows the retain answers (real_authors here), not the holdout ones
    assert results["tofu_prob_real_authors"]["value"] > results["tofu_prob_world_facts"]["value"]
    assert results["tofu_rouge_real_authors"]["value"] > 0.5
    assert results["tofu_truth_ratio_real_authors"]["value"] > 0  # not every ratio is clamped to 0


def test_model_utility_is_the_harmonic_mean_of_nine_values_with_two_utility_sets(trained, with_utility_sets):
    model, tokenizer = trained
    ev = Evaluator(model, tokenizer, with_utility_sets, EvalSettings(batch_size=4))
    utility = ev.compute("tofu_model_utility")
    retain = [
        ev.compute(n)["value"] for n in ("tofu_prob_retain", "tofu_rouge_retain", "tofu_truth_ratio_retain")
    ]
    values = list(retain)
    for name, pairs in with_utility_sets.utility_qa.items():
        expected = _set_values(model, tokenizer, pairs)
        recall = [
            rouge_l(p.answer, g["generated"])[1]
            for p, g in zip(pairs, ev.compute(f"tofu_rouge_{name}")["per_item"], strict=True)
        ]
        values += [
            np.mean(expected["normalised"]),
            np.mean(recall),
            np.mean([max(0.0, 1 - r) for r in expected["ratios"]]),
        ]
    assert len(values) == 9 and min(values) > 0
    assert utility["value"] == pytest.approx(stats.hmean(values), rel=1e-4)
    assert utility["value"] != pytest.approx(stats.hmean(retain), rel=1e-3)  # the sets change it
    assert utility["views"]["components"] == 9
    assert list(utility["views"])[1:] == [
        "tofu_prob_retain",
        "tofu_rouge_retain",
        "tofu_truth_ratio_retain",
        "tofu_prob_real_authors",
        "tofu_rouge_real_authors",
        "tofu_truth_ratio_real_authors",
        "tofu_prob_world_facts",
        "tofu_rouge_world_facts",
        "tofu_truth_ratio_world_facts",
    ]
    assert list(utility["views"].values())[1:] == pytest.approx(values, rel=1e-4)


def test_utility_set_metric_names_are_declared_and_checked(untrained, small_benchmark):
    # open-unlearning's nine components, in its order: retain, ra, wf x (Prob, ROUGE, Truth_Ratio)
    parts = tofu_utility_parts(["real_authors", "world_facts"])
    short = {"retain": "retain", "real_authors": "ra", "world_facts": "wf"}
    measure = {"prob": "Q_A_Prob", "rouge": "Q_A_ROUGE", "truth_ratio": "Truth_Ratio"}
    as_ou = []
    for part in parts:
        what, where = re.match(r"tofu_(prob|rouge|truth_ratio)_(\w+)$", part).groups()
        name = f"{short[where]}_{measure[what]}"
        as_ou.append(name + "_normalised" if what == "prob" and where != "retain" else name)
    assert tuple(as_ou) == tofu.MODEL_UTILITY_COMPONENTS
    assert tofu_utility_parts([]) == parts[:3]
    info = metric_info("tofu_truth_ratio_world_facts")
    assert info.kind == "utility" and info.higher_is_better is True
    assert resolve_metrics("tofu_prob_real_authors,tofu_rouge_x2") == [
        "tofu_prob_real_authors",
        "tofu_rouge_x2",
    ]
    for name in ("tofu_prob_holdout", "tofu_rouge_Real", "tofu_prob_"):
        assert metric_info(name) is None
        with pytest.raises(ConfigError, match="unknown metric"):
            resolve_metrics(name)
    model, tokenizer = untrained
    with pytest.raises(
        DataError, match=r"tofu_prob_world_facts needs utility_world_facts_qa\.jsonl.*: none\)"
    ):
        Evaluator(model, tokenizer, small_benchmark, EvalSettings()).compute("tofu_prob_world_facts")


# catalog and errors -----------------------------------------------------------------------------------
def test_the_tofu_group_and_the_catalog():
    assert resolve_metrics("tofu") == TOFU
    assert "tofu_forget_quality" in primary_choices()
    for name in TOFU:
        info = metric_info(name)
        assert info is not None, name
        assert info.kind == ("utility" if name.endswith(("_retain", "utility")) else "forgetting"), name
    assert metric_info("tofu_forget_quality").higher_is_better is True
    assert metric_info("tofu_forget_quality").recovery is True


def _old_format(directory, tmp_path):
    """A copy of a benchmark folder without the answer variants, as written before they existed."""
    out = tmp_path / "old"
    out.mkdir()
    for path in directory.iterdir():
        text = path.read_text(encoding="utf-8")
        if path.name.endswith("qa.jsonl") or path.name == "icl.jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
            for record in records:
                record.pop("paraphrased_answer", None)
                record.pop("perturbed_answer", None)
            text = "".join(json.dumps(r) + "\n" for r in records)
        (out / path.name).write_text(text, encoding="utf-8")
    return out


@pytest.mark.parametrize(
    "name",
    ["tofu_truth_ratio_forget", "tofu_truth_ratio_retain", "tofu_forget_quality", "tofu_model_utility"],
)
def test_an_old_format_benchmark_gives_one_clear_error_naming_the_missing_fields(
    name, untrained, small_benchmark_dir, tmp_path
):
    model, tokenizer = untrained
    old = load_benchmark(_old_format(small_benchmark_dir, tmp_path))
    settings = EvalSettings(batch_size=8, retrained_truth_ratios=[0.5, 1.0])
    with pytest.raises(ConfigError) as exc:
        Evaluator(model, tokenizer, old, settings).compute(name)
    message = str(exc.value)
    assert "\n" not in message
    assert "'paraphrased_answer'" in message and "'perturbed_answer'" in message, message
    assert name in message or "tofu_truth_ratio_retain" in message  # model utility names its component


def test_a_missing_field_alone_is_the_one_named(untrained, small_benchmark):
    model, tokenizer = untrained
    no_paraphrase = dataclasses.replace(
        small_benchmark,
        forget_qa=[dataclasses.replace(p, paraphrased_answer=None) for p in small_benchmark.forget_qa],
    )
    with pytest.raises(ConfigError, match=r"forget_qa\.jsonl has 'paraphrased_answer' \(") as exc:
        Evaluator(model, tokenizer, no_paraphrase, EvalSettings()).compute("tofu_truth_ratio_forget")
    assert "'perturbed_answer'" not in str(exc.value)


def test_metrics_without_variants_still_run_on_an_old_format_benchmark(
    untrained, small_benchmark_dir, tmp_path
):
    model, tokenizer = untrained
    old = load_benchmark(_old_format(small_benchmark_dir, tmp_path))
    result = Evaluator(model, tokenizer, old, EvalSettings(batch_size=8)).compute("tofu_prob_forget")
    assert result["views"]["items"] == len(old.forget_qa)


def test_forget_quality_without_a_reference_is_a_config_error(untrained, small_benchmark):
    model, tokenizer = untrained
    with pytest.raises(ConfigError, match="retrained model's forget truth ratios"):
        Evaluator(model, tokenizer, small_benchmark, EvalSettings()).compute("tofu_forget_quality")


def test_only_the_pairs_with_variants_are_used_when_some_have_them(trained, small_benchmark):
    """As TOFU scores its retain set on the questions of retain_perturbed alone."""
    model, tokenizer = trained
    retain = [
        dataclasses.replace(p, paraphrased_answer=None, perturbed_answers=())
        for p in small_benchmark.retain_qa
    ]
    retain[:3] = small_benchmark.retain_qa[:3]
    partial = dataclasses.replace(small_benchmark, retain_qa=retain)
    results = Evaluator(model, tokenizer, partial, EvalSettings(batch_size=8)).run(
        ["tofu_prob_retain", "tofu_truth_ratio_retain"]
    )
    assert [it["question"] for it in results["tofu_prob_retain"]["per_item"]] == [
        p.question for p in small_benchmark.retain_qa[:3]
    ]
    assert results["tofu_truth_ratio_retain"]["views"]["items"] == 3
