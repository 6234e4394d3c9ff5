"""Metrics against independent references: scoring, AUC, MIA statistics, ROUGE-L, prompts, the engine."""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np
import pytest
import torch

from relapse.data import load_benchmark, synth_benchmark
from relapse.data.benchmark import QAPair
from relapse.data.prompts import KnowMemPrompt, derive_verbmem, qa_prompt
from relapse.errors import ConfigError, DataError
from relapse.metrics import engine, mia
from relapse.metrics.engine import GROUPS, EvalSettings, Evaluator, resolve_metrics
from relapse.metrics.rouge import rouge_l
from relapse.metrics.scoring import TokenScores, perplexity, score_texts
from relapse.models import load_model
from relapse.models.tiny import TinyConfig, build_tiny


@pytest.fixture(scope="module")
def small_benchmark(small_benchmark_dir):
    return load_benchmark(small_benchmark_dir)


@pytest.fixture(scope="module")
def trained(trained_small):
    return load_model(trained_small.path)


# 1. scoring ------------------------------------------------------------------------------------------
def reference_scores(model, tokenizer, text: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """One text, no batching or padding: token log-probs and E_p[log p], sqrt(Var_p[log p]) in float64."""
    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    token = log_probs.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    probs = log_probs.exp()
    mean = (probs * log_probs).sum(-1)
    variance = (probs * (log_probs - mean[:, None]) ** 2).sum(-1)
    return ids, token.numpy(), mean.numpy(), variance.sqrt().numpy()


def scoring_texts(benchmark) -> list[str]:
    # Very different lengths (1 to ~50 tokens) in no sorted order, so batches are padded and reordered.
    return [
        benchmark.forget[0],
        "The",
        benchmark.general[0],
        benchmark.retain[0] + " " + benchmark.retain[1],
        "Question: where?",
        benchmark.holdout[0],
        benchmark.general[1],
    ]


@pytest.mark.parametrize("which", ["trained", "random"])
def test_batched_scores_match_one_text_reference(which, trained, small_benchmark):
    if which == "trained":
        model, tokenizer = trained
    else:
        # A random model is near uniform: a large |E[log p]| and a small variance, where a one-pass
        # E[x^2] - E[x]^2 in float32 loses the standard deviation.
        config = TinyConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
        model, tokenizer = build_tiny(config, small_benchmark, seed=0)
        model.eval()
    texts = scoring_texts(small_benchmark)
    scores = score_texts(model, tokenizer, texts, batch_size=4)
    assert len(scores) == len(texts)
    lengths = {s.n_tokens for s in scores}
    assert min(lengths) == 1 and max(lengths) > 40  # padding really happened
    for text, got in zip(texts, scores, strict=True):
        ids, token, mean, std = reference_scores(model, tokenizer, text)
        assert got.token_ids.tolist() == ids  # caller's order, not the length-sorted one
        assert got.n_tokens == len(ids) - 1
        np.testing.assert_allclose(got.logprobs, token, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got.mean_logprob, mean, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got.std_logprob, std, rtol=0, atol=1e-5)
        assert got.nll == pytest.approx(-token.mean(), abs=1e-5)


def test_perplexity_equals_hf_loss(trained, small_benchmark):
    model, tokenizer = trained
    text = small_benchmark.general[0]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        hf_loss = float(model(ids, labels=ids).loss)  # mean NLL over the shifted tokens
    assert perplexity(score_texts(model, tokenizer, [text])) == pytest.approx(math.exp(hf_loss), rel=1e-5)


def test_corpus_perplexity_is_token_weighted():
    short = TokenScores(np.zeros(2), np.array([-1.0]), np.zeros(1), np.zeros(1))
    long = TokenScores(np.zeros(4), np.array([-2.0, -2.0, -2.0]), np.zeros(3), np.zeros(3))
    assert perplexity([short, long]) == pytest.approx(math.exp(7 / 4))
    assert math.isnan(perplexity([]))


# 2. AUC and PrivLeak --------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_roc_auc_matches_sklearn(tied):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3 + tied)
    for _ in range(20):
        labels = rng.integers(0, 2, size=40)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 4, size=40).astype(float) if tied else rng.normal(size=40)
        ours = mia.roc_auc(labels, scores)
        fpr, tpr, _ = metrics.roc_curve(labels, scores)
        assert ours == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
        assert ours == pytest.approx(metrics.auc(fpr, tpr), abs=1e-12)


def test_roc_auc_hand_values_and_errors():
    assert mia.roc_auc([0, 1], [0.3, 0.3]) == 0.5
    assert mia.roc_auc([0, 0, 1], [1.0, 3.0, 2.0]) == 0.5
    with pytest.raises(ValueError):
        mia.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        mia.roc_auc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError):
        mia.roc_auc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        mia.roc_auc([0, 1, 1], [0.1, float("nan"), 0.3])


def test_membership_auc_direction_and_privleak():
    assert mia.membership_auc([5.0, 6.0, 7.0], [1.0, 2.0]) == 0.0  # forget looks like members
    assert mia.membership_auc([1.0, 2.0], [5.0, 6.0, 7.0]) == 1.0  # forget looks less than unseen
    assert mia.membership_auc([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert mia.privleak(0.25, 0.5) == -50.0
    assert mia.privleak(0.6, 0.4) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        mia.privleak(0.3, 0.0)


# 3. MIA statistics ----------------------------------------------------------------------------------
def token_scores(logprobs, mean=None, std=None) -> TokenScores:
    logprobs = np.asarray(logprobs, dtype=np.float64)
    n = logprobs.size
    return TokenScores(
        token_ids=np.arange(n + 1),
        logprobs=logprobs,
        mean_logprob=np.zeros(n) if mean is None else np.asarray(mean, dtype=np.float64),
        std_logprob=np.ones(n) if std is None else np.asarray(std, dtype=np.float64),
    )


def test_min_k():
    scores = token_scores([-1.0, -5.0, -2.0, -4.0, -3.0])
    assert mia.min_k_membership(scores, 0.4) == -4.5  # floor(5 * 0.4) = 2 lowest: -5, -4
    assert mia.min_k_membership(scores, 0.6) == -4.0  # -5, -4, -3
    assert mia.min_k_membership(scores, 0.1) == -5.0  # floor(0.5) = 0: the single lowest
    assert mia.min_k_membership(scores, 1.0) == -3.0
    assert math.isnan(mia.min_k_membership(token_scores([]), 0.4))


def test_min_k_plus_plus():
    # z = (logp - mean) / std = [(-1+2)/1, (-3+2)/2, (-0.5+1)/0.5, (-4+1)/1] = [1, -0.5, 1, -3]
    scores = token_scores([-1.0, -3.0, -0.5, -4.0], mean=[-2.0, -2.0, -1.0, -1.0], std=[1.0, 2.0, 0.5, 1.0])
    assert mia.min_k_plus_plus_membership(scores, 0.5) == pytest.approx(-1.75)  # -3, -0.5
    assert mia.min_k_plus_plus_membership(scores, 0.2) == pytest.approx(-3.0)  # floor(0.8) = 0 -> 1
    assert mia.min_k_plus_plus_membership(scores, 1.0) == pytest.approx(-1.5 / 4)


def test_loss_zlib_lowercase():
    text = "Zoë Tall was born in Ålesund. Zoë Tall was born in Ålesund."
    scores = token_scores([-1.0, -2.0, -6.0])
    assert mia.loss_membership(scores) == -3.0
    assert scores.nll == 3.0
    compressed = len(zlib.compress(text.encode("utf-8")))
    assert compressed < len(text.encode("utf-8"))
    assert mia.zlib_membership(scores, text) == pytest.approx(-3.0 / compressed)
    lower = token_scores([-4.0, -5.0])
    assert mia.lowercase_membership(scores, lower) == pytest.approx(4.5 / 3.0)


# 4. ROUGE-L -----------------------------------------------------------------------------------------
def test_rouge_l_hand_values():
    f1, recall = rouge_l("the cat sat on the mat", "the cat on mat")
    # LCS "the cat on mat" = 4: recall 4/6, precision 4/4, F1 = 2PR/(P+R) = 0.8
    assert recall == pytest.approx(4 / 6)
    assert f1 == pytest.approx(0.8)
    f1, recall = rouge_l("a b c d", "d c b a")  # LCS 1
    assert (f1, recall) == (pytest.approx(0.25), pytest.approx(0.25))
    assert rouge_l("the cat", "dog") == (0.0, 0.0)
    assert rouge_l("the cat", "the cat") == (1.0, 1.0)


def test_rouge_l_tokenization_ignores_case_and_punctuation():
    assert rouge_l("The Cat, sat!", "the cat sat") == (1.0, 1.0)
    assert rouge_l("born in Glenholm.", "  BORN   in... glenholm") == (1.0, 1.0)
    f1, recall = rouge_l("Glenholm", "Glenholm, then Ostmoor")
    assert recall == 1.0 and f1 == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))


# 5. VerbMem items and the KnowMem prompt ------------------------------------------------------------
def test_derive_verbmem():
    first_sentence = "Alice was born in Rome. She studied law at Oxford."
    too_long = "Alice was born in the old town of Rome. She left."
    no_sentence = "one two three four five"
    items = derive_verbmem([first_sentence, "Hello", "   ", too_long, no_sentence, "a b"])
    texts = [first_sentence, too_long, no_sentence, "a b"]
    assert [it.prompt + it.gt for it in items] == texts  # one-word and empty texts skipped
    assert items[0].prompt == "Alice was born in Rome."  # 5 of 9 words left >= 4.5
    assert items[0].gt == " She studied law at Oxford."
    assert items[1].prompt == "Alice was born in the"  # 2 of 11 words left: half the words instead
    assert items[1].gt == " old town of Rome. She left."
    assert (items[2].prompt, items[2].gt) == ("one two", " three four five")
    assert (items[3].prompt, items[3].gt) == ("a", " b")


def test_knowmem_prompt_muse_default():
    icl = [QAPair("Who?", "Ann"), QAPair("Where?", "Rome")]
    expected = "Question: Who?\nAnswer: Ann\n\nQuestion: Where?\nAnswer: Rome\n\nQuestion: When?\nAnswer: "
    assert KnowMemPrompt().build("When?", icl) == expected
    assert KnowMemPrompt.from_meta({}) == KnowMemPrompt()
    assert (
        KnowMemPrompt(shots=1).build("When?", icl)
        == "Question: Who?\nAnswer: Ann\n\nQuestion: When?\nAnswer: "
    )
    assert KnowMemPrompt(shots=0, trailing_space=False).build("When?", icl) == qa_prompt("When?")
    prompt = KnowMemPrompt.from_meta({"knowmem_prompt": {"shots": 1, "trailing_space": False}})
    assert prompt == KnowMemPrompt(shots=1, trailing_space=False)
    assert prompt.to_json() == {"shots": 1, "trailing_space": False}


@pytest.mark.parametrize(
    "spec",
    [
        [0],
        "zero-shot",
        {"shots": -1},
        {"shots": True},
        {"shots": "2"},
        {"shots": 1.0},
        {"trailing_space": "no"},
        {"trailing_space": 1},
        {"shots": 0, "stops": ["\n"]},
    ],
)
def test_knowmem_prompt_rejects_bad_meta(spec):
    with pytest.raises(DataError, match="knowmem_prompt"):
        KnowMemPrompt.from_meta({"knowmem_prompt": spec})


def test_builtin_benchmark_asks_zero_shot(small_benchmark):
    for meta in (small_benchmark.meta, synth_benchmark(people=4, facts_per_person=1, general=2).meta):
        prompt = KnowMemPrompt.from_meta(meta)
        assert prompt.shots == 0 and prompt.trailing_space is False
        assert prompt.build("Who?", small_benchmark.icl) == qa_prompt("Who?")


# 6. the engine --------------------------------------------------------------------------------------
def test_resolve_metrics():
    assert resolve_metrics("mia") == list(GROUPS["mia"]) and len(GROUPS["mia"]) == 11
    assert resolve_metrics("knowmem, utility") == ["knowmem_forget", "knowmem_retain", "ppl_general"]
    assert resolve_metrics("verbmem_forget,verbmem,,verbmem") == ["verbmem_forget"]
    assert resolve_metrics(["mia_mink_25", "mia_minkpp_100"]) == ["mia_mink_25", "mia_minkpp_100"]
    for bad in ("bogus", "verbmem,bogus", "mia_mink_0", "mia_mink_101", "mia_minkpp_x", "", " , "):
        with pytest.raises(ConfigError):
            resolve_metrics(bad)


def test_mia_recognises_the_memorised_forget_set(trained, small_benchmark):
    metrics = pytest.importorskip("sklearn.metrics")
    model, tokenizer = trained
    results = Evaluator(model, tokenizer, small_benchmark, EvalSettings(batch_size=8)).run(GROUPS["mia"])
    for name, result in results.items():
        assert result["value"] < 0.5, name  # the holdout people were never trained on
        assert result["best"] == 0.5 and result["higher_is_better"] is None
    # LOSS independently: membership = -HF loss, forget label 0, holdout label 1.
    texts = small_benchmark.forget + small_benchmark.holdout
    membership = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            membership.append(-float(model(ids, labels=ids).loss))
    labels = [0] * len(small_benchmark.forget) + [1] * len(small_benchmark.holdout)
    assert results["mia_loss"]["value"] == pytest.approx(metrics.roc_auc_score(labels, membership))
    stored = [item["membership"] for item in results["mia_loss"]["per_item"]]
    np.testing.assert_allclose(stored, membership, atol=1e-5)


def test_privleak_needs_reference_and_uses_min40(trained, small_benchmark):
    model, tokenizer = trained
    with pytest.raises(ConfigError, match="--retrained"):
        Evaluator(model, tokenizer, small_benchmark, EvalSettings(batch_size=8)).compute("privleak")
    settings = EvalSettings(batch_size=8, retrained_auc=0.5)
    ev = Evaluator(model, tokenizer, small_benchmark, settings)
    result = ev.compute("privleak")
    auc = ev.compute("mia_mink_40")["value"]
    assert result["auc"] == auc
    assert result["value"] == pytest.approx((auc - 0.5) / 0.5 * 100)
    assert result["retrained_auc"] == 0.5 and result["best"] == 0.0


def test_mia_family_shares_one_scoring_pass(trained, small_benchmark, monkeypatch):
    model, tokenizer = trained
    calls = []

    def counting(model, tokenizer, texts, **kwargs):
        calls.append(list(texts))
        return score_texts(model, tokenizer, texts, **kwargs)

    monkeypatch.setattr(engine, "score_texts", counting)
    ev = Evaluator(model, tokenizer, small_benchmark, EvalSettings(batch_size=8, retrained_auc=0.5))
    ev.run(["mia_loss", "mia_zlib", "mia_mink_40", "mia_minkpp_20", "privleak"])
    assert calls == [small_benchmark.forget, small_benchmark.holdout]
    ev.compute("mia_lowercase")  # one more pass, over the lower-cased texts only
    assert len(calls) == 4
    assert calls[2:] == [
        [t.lower() for t in small_benchmark.forget],
        [t.lower() for t in small_benchmark.holdout],
    ]


@pytest.fixture(scope="module")
def mixed_benchmark(small_benchmark):
    """Known (forget) and unknown (holdout) items together, so ROUGE values are not all 1."""
    return dataclasses.replace(
        small_benchmark,
        forget_qa=small_benchmark.forget_qa[:3] + small_benchmark.holdout_qa[:5],
        verbmem=derive_verbmem(small_benchmark.forget[:2] + small_benchmark.holdout[:2]),
    )


def test_rouge_metrics_per_item_recompute(trained, mixed_benchmark):
    model, tokenizer = trained
    settings = EvalSettings(batch_size=8, verbmem_max_new_tokens=12, knowmem_max_new_tokens=8)
    results = Evaluator(model, tokenizer, mixed_benchmark, settings).run(["verbmem_forget", "knowmem_forget"])
    verbmem, knowmem = results["verbmem_forget"], results["knowmem_forget"]
    assert [it["prompt"] for it in verbmem["per_item"]] == [it.prompt for it in mixed_benchmark.verbmem]
    assert [it["question"] for it in knowmem["per_item"]] == [p.question for p in mixed_benchmark.forget_qa]
    for result, key in ((verbmem, "gt"), (knowmem, "answer")):
        f1s = []
        for item in result["per_item"]:
            f1, recall = rouge_l(item[key], item["generated"])
            assert (item["rougeL_f1"], item["rougeL_recall"]) == (pytest.approx(f1), pytest.approx(recall))
            f1s.append(f1)
        assert len(set(f1s)) > 1  # memorised and unseen items score differently
        assert result["value"] == pytest.approx(100 * np.mean(f1s))
        assert result["higher_is_better"] is False
    # The VerbMem reference is the true continuation cut to the tokens the model may generate.
    for item, source in zip(verbmem["per_item"], mixed_benchmark.verbmem, strict=True):
        assert len(tokenizer(item["gt"], add_special_tokens=False)["input_ids"]) <= 12
        assert " ".join(source.gt.split()).startswith(" ".join(item["gt"].split()))
    assert knowmem["prompt"] == {"shots": 0, "trailing_space": False}


@pytest.mark.parametrize("prompt", [None, {"shots": 2, "trailing_space": False}], ids=["builtin", "icl"])
def test_knowmem_generation_independent_of_batch_size(prompt, trained, mixed_benchmark):
    model, tokenizer = trained
    bench = mixed_benchmark
    if prompt is not None:  # few-shot prompts: longer, so batches are left-padded differently
        bench = dataclasses.replace(mixed_benchmark, meta={"knowmem_prompt": prompt})
    outputs = []
    for batch_size in (8, 1):
        ev = Evaluator(model, tokenizer, bench, EvalSettings(batch_size=batch_size, knowmem_max_new_tokens=8))
        outputs.append([it["generated"] for it in ev.compute("knowmem_forget")["per_item"]])
    assert outputs[0] == outputs[1]
    assert sum(bool(text) for text in outputs[0]) >= 4  # the model answers (not only EOS)


def test_answer_nll_equals_direct_teacher_forcing(trained, small_benchmark):
    """nll_forget/nll_retain: the mean -log p of the answer tokens after the zero-shot prompt, per item."""
    model, tokenizer = trained
    bench = dataclasses.replace(small_benchmark, retain_qa=small_benchmark.retain_qa[:5])
    result = Evaluator(model, tokenizer, bench, EvalSettings(batch_size=3)).run(["nll_forget", "nll_retain"])
    for name, split in (("nll_forget", bench.forget_qa), ("nll_retain", bench.retain_qa)):
        expected = []
        for pair in split:
            prompt = tokenizer(qa_prompt(pair.question))["input_ids"]
            full = tokenizer(f"{qa_prompt(pair.question)} {pair.answer}")["input_ids"]
            assert full[: len(prompt)] == prompt  # the word tokenizer keeps the prompt as a prefix
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
            answer = [-float(log_probs[i - 1, full[i]]) for i in range(len(prompt), len(full))]
            expected.append(sum(answer) / len(answer))
        got = [item["nll"] for item in result[name]["per_item"]]
        assert got == pytest.approx(expected, abs=1e-5)
        assert result[name]["value"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    assert (
        result["nll_forget"]["higher_is_better"] is True and result["nll_retain"]["higher_is_better"] is False
    )
    assert result["nll_retain"]["value"] < 1.0, (
        "a memorising model answers its training questions confidently"
    )
