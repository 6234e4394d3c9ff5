"""QA recall: the share of questions a model answers exactly (after light normalisation).

This is the quick memorisation check used by training's stop rule and by the demo; MUSE's KnowMem (few
shot prompts, ROUGE-L) lives beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from relapse.data.benchmark import QAPair
from relapse.data.prompts import answer_matches, qa_prompt
from relapse.metrics.generation import greedy_generate

#: Enough new tokens for every built-in answer; generation stops at EOS or a newline before that.
QA_MAX_NEW_TOKENS = 16


def qa_recall(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[QAPair],
    batch_size: int = 64,
    max_new_tokens: int = QA_MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """Exact-match recall of ``pairs`` under zero-shot greedy answering.

    Returns ``{"value": share correct, "higher_is_better": True, "per_item": [{question, answer,
    generated, correct}]}``.
    """
    generated = greedy_generate(
        model,
        tokenizer,
        [qa_prompt(p.question) for p in pairs],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_strings=("\n",),
    )
    per_item = [
        {
            "question": p.question,
            "answer": p.answer,
            "generated": g.strip(),
            "correct": answer_matches(g, p.answer),
        }
        for p, g in zip(pairs, generated, strict=True)
    ]
    value = sum(item["correct"] for item in per_item) / len(per_item) if per_item else float("nan")
    return {"value": value, "higher_is_better": True, "per_item": per_item}
