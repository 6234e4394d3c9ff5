"""Batched greedy generation equals a plain one-prompt-at-a-time reference; QA recall counts right."""

from __future__ import annotations

import torch

from relapse.data import load_benchmark
from relapse.data.benchmark import QAPair
from relapse.data.prompts import answer_matches, normalize_answer, qa_prompt
from relapse.metrics import greedy_generate, qa_recall
from relapse.models import load_model


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy decoding the slow way: no batching, no padding, no KV cache, full forward every step."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_batched_generation_matches_reference(trained_small, small_benchmark_dir):
    model, tokenizer = load_model(trained_small.path)
    benchmark = load_benchmark(small_benchmark_dir)
    # Prompts of very different lengths so that left padding is exercised.
    prompts = (
        [qa_prompt(p.question) for p in benchmark.forget_qa[:6]]
        + [text[: len(text) // 3] for text in benchmark.retain[:6]]
        + ["The"]
    )
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=5)
    for prompt, text in zip(prompts, batched, strict=True):
        expected = tokenizer.decode(reference_greedy(model, tokenizer, prompt, 12), skip_special_tokens=True)
        assert text == expected, prompt


def test_stop_strings_cut_the_continuation(trained_small, small_benchmark_dir):
    model, tokenizer = load_model(trained_small.path)
    benchmark = load_benchmark(small_benchmark_dir)
    prompt = benchmark.retain[0].split(".")[0]
    full = greedy_generate(model, tokenizer, [prompt], max_new_tokens=20)[0]
    assert "." in full
    cut = greedy_generate(model, tokenizer, [prompt], max_new_tokens=20, stop_strings=(".",))[0]
    assert cut == full[: full.index(".")]


def test_qa_recall_counts_exact_answers(trained_small, small_benchmark_dir):
    model, tokenizer = load_model(trained_small.path)
    benchmark = load_benchmark(small_benchmark_dir)
    known = benchmark.forget_qa[:4]
    wrong = [QAPair(p.question, p.answer + " Junior") for p in known]
    result = qa_recall(model, tokenizer, known + wrong)
    flags = [item["correct"] for item in result["per_item"]]
    assert flags == [True] * 4 + [False] * 4
    assert result["value"] == 0.5
    assert result["higher_is_better"] is True


def test_answer_normalisation():
    assert normalize_answer("  Ostmoor. ") == "ostmoor"
    assert answer_matches(" marine  biologist", "Marine biologist")
    assert not answer_matches("marine", "marine biologist")


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(trained_small, small_benchmark_dir):
    """Rows of one batch stop at different steps (EOS, a stop string, the token limit): each one's text
    still equals the reference's, cut at its first stop string."""
    model, tokenizer = load_model(trained_small.path)
    benchmark = load_benchmark(small_benchmark_dir)
    prompts = [qa_prompt(p.question) for p in benchmark.forget_qa[:3]] + [
        " ".join(text.split()[:n]) for text, n in zip(benchmark.retain[:5], (2, 4, 6, 8, 10), strict=True)
    ]
    stops = (".", "\nQuestion")
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=8, stop_strings=stops)
    for prompt, text in zip(prompts, batched, strict=True):
        full = tokenizer.decode(reference_greedy(model, tokenizer, prompt, 16), skip_special_tokens=True)
        cuts = [full.index(stop) for stop in stops if stop in full]
        assert text == full[: min(cuts)] if cuts else text == full, prompt
