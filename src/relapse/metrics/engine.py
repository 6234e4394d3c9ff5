"""The evaluation engine: one registry of metric names, shared work computed once per model.

Every metric is a function of an :class:`Evaluator` and returns one schema::

    {"value": float, "higher_is_better": bool | None, "best": float | None, "per_item": [...],
     "views": {...}, "seconds": float, "item_values": [float, ...] (means only), ...}

A metric that is a mean over items (KnowMem, VerbMem, QA recall, answer NLL) also returns
``item_values``, one number per item whose mean is ``value``; the membership AUCs and PrivLeak return
``member_scores`` (``{"forget": [...], "holdout": [...]}``), and perplexity ``text_scores`` (each text's
token count and summed NLL). The audit's bootstrap intervals resample them
(:mod:`relapse.metrics.bootstrap`).

``higher_is_better`` and ``best`` are each metric's declaration in :mod:`relapse.metrics.catalog`
(``False`` for what a model should forget, ``True`` for utility, ``None`` for two-sided numbers whose
ideal is ``best``), copied into every result so that a results file reads on its own.

The Evaluator caches what several metrics share: one scoring pass over the forget and holdout texts
feeds PrivLeak and every MIA variant, and generations are cached by prompt set.

Names (also the CLI's ``--metrics``; groups expand to several names):

================  =====================================================================
verbmem           verbmem_forget
knowmem           knowmem_forget, knowmem_retain
privleak          privleak (needs the retrained model's AUC)
utility           knowmem_retain, ppl_general
mia               mia_loss, mia_zlib, mia_lowercase, mia_mink_{10,20,40,60}, mia_minkpp_{10,20,40,60}
recall            recall_forget, recall_retain (zero-shot exact-match QA recall)
nll               nll_forget, nll_retain (mean NLL of the answer tokens given the zero-shot prompt)
tofu              TOFU's metrics (open-unlearning's definitions, :mod:`relapse.metrics.tofu`):
                  tofu_prob_forget, tofu_truth_ratio_forget, tofu_exact_mem_forget,
                  tofu_extraction_forget, tofu_forget_quality (needs the retrained model's forget
                  truth ratios), tofu_prob_retain, tofu_rouge_retain, tofu_truth_ratio_retain,
                  tofu_model_utility (with the three below for each utility QA set)
================  =====================================================================

Each utility QA set ``S`` of the benchmark (``utility_S_qa.jsonl``; TOFU's real_authors, world_facts) also
has ``tofu_prob_S``, ``tofu_rouge_S`` and ``tofu_truth_ratio_S``, asked for by name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from relapse.data.benchmark import (
    FORGET,
    GENERAL,
    HOLDOUT,
    PARAPHRASED_FIELD,
    PERTURBED_FIELD,
    RETAIN,
    Benchmark,
    QAPair,
    VerbMemItem,
)
from relapse.data.prompts import (
    KNOWMEM_STOP_STRINGS,
    KnowMemPrompt,
    derive_verbmem,
    normalize_answer,
    qa_prompt,
)
from relapse.errors import ConfigError, DataError
from relapse.metrics import mia, tofu
from relapse.metrics.catalog import metric_info, mink_parameters, tofu_set_parameters, tofu_utility_parts
from relapse.metrics.generation import greedy_generate
from relapse.metrics.qa import qa_recall
from relapse.metrics.rouge import rouge_l
from relapse.metrics.scoring import TokenScores, perplexity, score_texts

#: Min-K% shares of the ``mia`` group, in percent.
MIA_KS = (10, 20, 40, 60)

GROUPS: dict[str, tuple[str, ...]] = {
    "verbmem": ("verbmem_forget",),
    "knowmem": ("knowmem_forget", "knowmem_retain"),
    "privleak": ("privleak",),
    "utility": ("knowmem_retain", "ppl_general"),
    "mia": (
        "mia_loss",
        "mia_zlib",
        "mia_lowercase",
        *(f"mia_mink_{k}" for k in MIA_KS),
        *(f"mia_minkpp_{k}" for k in MIA_KS),
    ),
    "recall": ("recall_forget", "recall_retain"),
    "nll": ("nll_forget", "nll_retain"),
    "tofu": (
        "tofu_prob_forget",
        "tofu_truth_ratio_forget",
        "tofu_exact_mem_forget",
        "tofu_extraction_forget",
        "tofu_forget_quality",
        "tofu_prob_retain",
        "tofu_rouge_retain",
        "tofu_truth_ratio_retain",
        "tofu_model_utility",
    ),
}

#: New tokens TOFU's ROUGE may generate per answer (open-unlearning's generation limit for TOFU).
TOFU_MAX_NEW_TOKENS = 200

#: What ``relapse eval`` computes when ``--metrics`` is not given (privleak only with a retrained AUC).
DEFAULT_METRICS = "verbmem,knowmem,privleak,utility"


@dataclass
class EvalSettings:
    """Options of one evaluation; recorded with its results."""

    batch_size: int | None = None  # None: chosen from free memory
    verbmem_max_new_tokens: int = 128
    knowmem_max_new_tokens: int = 32
    max_tokens: int | None = None  # scoring cuts texts to this (default: the model's limit, <= 2048)
    retrained_auc: float | None = None  # PrivLeak's reference: the retrained model's Min-40% AUC
    progress: bool = False
    # Forget quality's reference: the retrained model's per-item forget truth ratios (TOFU)
    retrained_truth_ratios: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        """The settings, with the retrained truth ratios as their count (the list is the reference's)."""
        settings = asdict(self)
        ratios = settings.pop("retrained_truth_ratios")
        if ratios is not None:
            settings["retrained_truth_ratio_items"] = len(ratios)
        return settings


class Evaluator:
    """Computes named metrics of one model on one benchmark, sharing work between them.

    The cache lives as long as the Evaluator; make a new one after changing the model's weights (the
    audit does so for every attack).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        benchmark: Benchmark,
        settings: EvalSettings | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.benchmark = benchmark
        self.settings = settings or EvalSettings()
        self._scores: dict[str, list[TokenScores]] = {}
        self._generations: dict[str, list[str]] = {}
        self._answers: dict[str, list[AnswerTokens]] = {}

    # shared work -------------------------------------------------------------------------------------
    def texts(self, split: str) -> list[str]:
        """Texts of ``forget``, ``holdout``, ``general``, ``mia_forget`` or ``mia_holdout`` (the lists
        membership inference compares: the benchmark's own when it has them, else forget and holdout),
        or of any of these lower-cased (``forget:lower``)."""
        base, _, variant = split.partition(":")
        texts = list(getattr(self.benchmark, base))
        if base.startswith("mia_") and not texts:
            texts = list(getattr(self.benchmark, base.removeprefix("mia_")))
        return [t.lower() for t in texts] if variant == "lower" else texts

    def scores(self, split: str) -> list[TokenScores]:
        if split not in self._scores:
            self._scores[split] = score_texts(
                self.model,
                self.tokenizer,
                self.texts(split),
                batch_size=self.settings.batch_size,
                max_tokens=self.settings.max_tokens,
                progress=self.settings.progress,
                desc=f"score {split}",
            )
        return self._scores[split]

    def generate(
        self, key: str, prompts: Sequence[str], max_new_tokens: int, stops: Sequence[str]
    ) -> list[str]:
        if key not in self._generations:
            self._generations[key] = greedy_generate(
                self.model,
                self.tokenizer,
                prompts,
                max_new_tokens=max_new_tokens,
                batch_size=self.settings.batch_size or 64,
                stop_strings=stops,
            )
        return self._generations[key]

    def answer_scores(self, key: str, questions: Sequence[str], answers: Sequence[str]) -> list[AnswerTokens]:
        """The answer tokens' statistics of each ``answers[i]`` to ``questions[i]`` under the zero-shot
        prompt, in one batched scoring pass, cached under ``key``."""
        if key not in self._answers:
            self._answers[key] = answer_tokens(self, questions, answers)
        return self._answers[key]

    def verbmem_items(self) -> list[VerbMemItem]:
        return self.benchmark.verbmem or derive_verbmem(self.benchmark.forget)

    # running -----------------------------------------------------------------------------------------
    def compute(self, name: str) -> dict[str, Any]:
        spec = metric_spec(name)
        started = time.perf_counter()
        result = spec(self)
        result["seconds"] = time.perf_counter() - started
        return result

    def run(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {name: self.compute(name) for name in names}


# metric functions ------------------------------------------------------------------------------------
def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def verbmem_forget(ev: Evaluator) -> dict[str, Any]:
    """MUSE VerbMem: ROUGE-L F1 (x100) of the greedy continuation against the true continuation.

    The reference is cut to the first ``verbmem_max_new_tokens`` tokens of the model's tokenizer, the
    length the model may generate.
    """
    items = ev.verbmem_items()
    if not items:
        raise DataError("VerbMem needs forget texts of two words or more, or a verbmem.jsonl")
    limit = ev.settings.verbmem_max_new_tokens
    generated = ev.generate("verbmem", [it.prompt for it in items], limit, ())
    per_item = []
    for item, output in zip(items, generated, strict=True):
        gt_ids = ev.tokenizer(item.gt, add_special_tokens=False)["input_ids"][:limit]
        reference = ev.tokenizer.decode(gt_ids, skip_special_tokens=True)
        f1, recall = rouge_l(reference, output)
        per_item.append(
            {
                "prompt": item.prompt,
                "gt": reference,
                "generated": output,
                "rougeL_f1": f1,
                "rougeL_recall": recall,
            }
        )
    return _rouge_result(per_item, _direction("verbmem_forget"), exact_key="gt")


def _direction(name: str) -> bool | None:
    """``higher_is_better`` as :mod:`relapse.metrics.catalog` declares it for ``name``."""
    return metric_info(name).higher_is_better


def _rouge_items(pairs: Sequence[QAPair], generated: Sequence[str]) -> list[dict[str, Any]]:
    """Per question: the answer, what the model generated, and ROUGE-L F1 and recall between them."""
    per_item = []
    for pair, output in zip(pairs, generated, strict=True):
        f1, recall = rouge_l(pair.answer, output)
        per_item.append(
            {
                "question": pair.question,
                "answer": pair.answer,
                "generated": output.strip(),
                "rougeL_f1": f1,
                "rougeL_recall": recall,
            }
        )
    return per_item


def _knowmem(ev: Evaluator, pairs: Sequence[QAPair], split: str) -> dict[str, Any]:
    if not pairs:
        raise DataError(f"KnowMem on {split} needs {split}_qa.jsonl with at least one question")
    prompt = KnowMemPrompt.from_meta(ev.benchmark.meta)
    prompts = [prompt.build(p.question, ev.benchmark.icl) for p in pairs]
    generated = ev.generate(
        f"knowmem_{split}", prompts, ev.settings.knowmem_max_new_tokens, KNOWMEM_STOP_STRINGS
    )
    per_item = _rouge_items(pairs, generated)
    result = _rouge_result(per_item, _direction(f"knowmem_{split}"), exact_key="answer")
    result["prompt"] = prompt.to_json()
    return result


def _rouge_result(
    per_item: list[dict[str, Any]], higher_is_better: bool | None, exact_key: str
) -> dict[str, Any]:
    for item in per_item:
        item["exact_match"] = normalize_answer(item["generated"]) == normalize_answer(item[exact_key])
    return {
        "value": 100 * _mean([it["rougeL_f1"] for it in per_item]),
        "higher_is_better": higher_is_better,
        "best": None,
        "views": {
            "rougeL_recall": 100 * _mean([it["rougeL_recall"] for it in per_item]),
            "exact_match": 100 * _mean([float(it["exact_match"]) for it in per_item]),
        },
        "per_item": per_item,
        "item_values": [100 * it["rougeL_f1"] for it in per_item],
    }


def knowmem_forget(ev: Evaluator) -> dict[str, Any]:
    """MUSE KnowMem on the forget QA set (ROUGE-L F1 x100): what the model still knows."""
    return _knowmem(ev, ev.benchmark.forget_qa, FORGET)


def knowmem_retain(ev: Evaluator) -> dict[str, Any]:
    """MUSE KnowMem on the retain QA set: the knowledge unlearning must keep (utility)."""
    return _knowmem(ev, ev.benchmark.retain_qa, RETAIN)


def ppl_general(ev: Evaluator) -> dict[str, Any]:
    """Perplexity on ``general.jsonl`` (token-weighted over all texts): general language utility."""
    if not ev.benchmark.general:
        raise DataError("perplexity needs general.jsonl (general text the model should still model)")
    scores = ev.scores(GENERAL)
    return {
        "value": perplexity(scores),
        "higher_is_better": _direction("ppl_general"),
        "best": None,
        "views": {"mean_nll": _mean([s.nll for s in scores])},
        "per_item": [{"tokens": s.n_tokens, "perplexity": math.exp(s.nll)} for s in scores],
        # Per text, for the bootstrap interval: its token count and the sum of its tokens' NLL.
        "text_scores": {
            "tokens": [s.n_tokens for s in scores],
            "nll_sums": [float(-s.logprobs.sum()) for s in scores],
        },
    }


def _membership_result(
    ev: Evaluator, name: str, membership: Callable[[str, int, TokenScores], float]
) -> dict[str, Any]:
    if not ev.texts("mia_holdout"):
        raise DataError("membership inference needs holdout.jsonl texts the model never saw")
    splits = {
        split: [membership(f"mia_{split}", i, s) for i, s in enumerate(ev.scores(f"mia_{split}"))]
        for split in (FORGET, HOLDOUT)
    }
    auc = mia.membership_auc(splits[FORGET], splits[HOLDOUT])
    info = metric_info(name)
    return {
        "value": auc,
        "higher_is_better": info.higher_is_better,
        "best": info.best,
        "views": {},
        "member_scores": splits,  # for the AUC's bootstrap interval (relapse.metrics.bootstrap)
        "per_item": [
            {"split": split, "index": i, "membership": value}
            for split, values in splits.items()
            for i, value in enumerate(values)
        ],
    }


def mia_loss(ev: Evaluator) -> dict[str, Any]:
    """AUC of the LOSS attack (forget = 0, holdout = 1; near 0: the forget set is still recognised)."""
    return _membership_result(ev, "mia_loss", lambda split, i, s: mia.loss_membership(s))


def mia_zlib(ev: Evaluator) -> dict[str, Any]:
    """AUC of the zlib-ratio attack."""
    return _membership_result(ev, "mia_zlib", lambda split, i, s: mia.zlib_membership(s, ev.texts(split)[i]))


def mia_lowercase(ev: Evaluator) -> dict[str, Any]:
    """AUC of the lowercase-ratio attack (one more scoring pass, over lower-cased texts)."""
    return _membership_result(
        ev, "mia_lowercase", lambda split, i, s: mia.lowercase_membership(s, ev.scores(f"{split}:lower")[i])
    )


def _mink(k: int, plus_plus: bool) -> Callable[[Evaluator], dict[str, Any]]:
    name = f"mia_mink{'pp' if plus_plus else ''}_{k}"

    def compute(ev: Evaluator) -> dict[str, Any]:
        score = mia.min_k_plus_plus_membership if plus_plus else mia.min_k_membership
        return _membership_result(ev, name, lambda split, i, s: score(s, k / 100))

    compute.__doc__ = f"AUC of Min-K%{'++' if plus_plus else ''} Prob with K = {k}%."
    return compute


def privleak(ev: Evaluator) -> dict[str, Any]:
    """MUSE PrivLeak: the Min-40% AUC relative to the retrained model's, in percent (near 0 is good)."""
    reference = ev.settings.retrained_auc
    if reference is None:
        raise ConfigError(
            "privleak needs the retrained model's AUC: pass --retrained MODEL or --retrained-auc X "
            f"(MUSE's: news {mia.MUSE_RETRAINED_AUC['news']}, books {mia.MUSE_RETRAINED_AUC['books']})"
        )
    auc_result = _mink(round(mia.PRIVLEAK_K * 100), plus_plus=False)(ev)
    info = metric_info("privleak")
    return {
        "value": mia.privleak(auc_result["value"], reference),
        "higher_is_better": info.higher_is_better,
        "best": info.best,
        "auc": auc_result["value"],
        "retrained_auc": reference,
        "views": {"auc": auc_result["value"], "retrained_auc": reference},
        "per_item": auc_result["per_item"],
        "member_scores": auc_result["member_scores"],
    }


def recall_forget(ev: Evaluator) -> dict[str, Any]:
    """Zero-shot exact-match QA recall on the forget set (the quick check training uses)."""
    return _recall(ev, ev.benchmark.forget_qa, _direction("recall_forget"))


def recall_retain(ev: Evaluator) -> dict[str, Any]:
    """Zero-shot exact-match QA recall on the retain set."""
    return _recall(ev, ev.benchmark.retain_qa, _direction("recall_retain"))


def _recall(ev: Evaluator, pairs: Sequence[QAPair], higher_is_better: bool | None) -> dict[str, Any]:
    result = qa_recall(ev.model, ev.tokenizer, pairs, batch_size=ev.settings.batch_size or 64)
    result.update(higher_is_better=higher_is_better, best=None, views={})
    result["item_values"] = [float(item["correct"]) for item in result["per_item"]]
    return result


@dataclass(frozen=True)
class AnswerTokens:
    """One answer's tokens given its question: the log-probability of each under teacher forcing, and
    whether it is the model's most likely token there (argmax)."""

    logprobs: np.ndarray
    correct: np.ndarray

    @property
    def nll(self) -> float:
        """Mean NLL per answer token (NaN for an answer without tokens)."""
        return float(-self.logprobs.mean()) if self.logprobs.size else float("nan")


def answer_tokens(ev: Evaluator, questions: Sequence[str], answers: Sequence[str]) -> list[AnswerTokens]:
    """Per answer, its tokens' statistics after the zero-shot prompt ``Question: {q}\nAnswer:``, the
    text being the prompt, a space and the answer (``qa_text``), scored in one batched pass.

    The answer's tokens are those after the prompt's: the prompt's tokens are a prefix of the text's up
    to a merge at the boundary, where the merged token counts as the answer's. No EOS is appended (as
    in every relapse likelihood metric; open-unlearning's TOFU counts its EOS label in the probability
    and leaves it out of exact memorisation and extraction strength).
    """
    from relapse.data.prompts import qa_text
    from relapse.metrics.scoring import encode_for_scoring, model_max_tokens

    pairs = [QAPair(q, a) for q, a in zip(questions, answers, strict=True)]
    limit = ev.settings.max_tokens or model_max_tokens(ev.model)
    prompts = encode_for_scoring(ev.tokenizer, [qa_prompt(p.question) for p in pairs], limit)
    scores = score_texts(
        ev.model, ev.tokenizer, [qa_text(p) for p in pairs], ev.settings.batch_size, ev.settings.max_tokens
    )
    out = []
    for prompt_ids, score in zip(prompts, scores, strict=True):
        full_ids = score.token_ids.tolist()
        shared = 0  # the prompt's tokens are a prefix of the full text's, up to a merge at the boundary
        while shared < min(len(prompt_ids), len(full_ids)) and prompt_ids[shared] == full_ids[shared]:
            shared += 1
        start = max(shared - 1, 0)
        logprobs = score.logprobs[start:]
        correct = score.top_ids[start:] == score.token_ids[start + 1 :]
        out.append(AnswerTokens(logprobs=logprobs, correct=correct))
    return out


def _answer_nll(ev: Evaluator, pairs: Sequence[QAPair], higher_is_better: bool | None) -> dict[str, Any]:
    """Mean NLL per answer token of each QA pair under teacher forcing, with the zero-shot prompt.

    A softer view than exact-match recall: it moves before any answer flips, so it shows small
    recoveries (docs/study-smollm2.md reports it beside recall).
    """
    if not pairs:
        raise DataError("answer NLL needs QA pairs")
    answers = answer_tokens(ev, [p.question for p in pairs], [p.answer for p in pairs])
    per_item = []
    for pair, answer in zip(pairs, answers, strict=True):
        per_item.append(
            {
                "question": pair.question,
                "answer": pair.answer,
                "tokens": int(answer.logprobs.size),
                "nll": answer.nll,
            }
        )
    return {
        "value": _mean([it["nll"] for it in per_item]),
        "higher_is_better": higher_is_better,
        "best": None,
        "views": {},
        "per_item": per_item,
        "item_values": [it["nll"] for it in per_item],
    }


def nll_forget(ev: Evaluator) -> dict[str, Any]:
    """Mean answer NLL on the forget QA set (higher: more forgotten)."""
    return _answer_nll(ev, ev.benchmark.forget_qa, _direction("nll_forget"))


def nll_retain(ev: Evaluator) -> dict[str, Any]:
    """Mean answer NLL on the retain QA set (lower: knowledge kept)."""
    return _answer_nll(ev, ev.benchmark.retain_qa, _direction("nll_retain"))


# TOFU -------------------------------------------------------------------------------------------------
def _tofu_pairs(ev: Evaluator, split: str, name: str, variants: bool) -> list[QAPair]:
    """The QA pairs TOFU's metrics use on ``split``: those with answer variants when any has them (as TOFU
    scores its retain set on the questions of ``retain_perturbed``), else all of them; a metric that needs
    the variants (``variants``) then stops with a :class:`ConfigError` naming the missing field."""
    pairs = list(getattr(ev.benchmark, f"{split}_qa"))
    if not pairs:
        raise DataError(f"{name} needs {split}_qa.jsonl with at least one question")
    with_variants = [p for p in pairs if p.has_variants]
    if with_variants:
        return with_variants
    if not variants:
        return pairs
    missing = [
        repr(field)
        for field, present in (
            (PARAPHRASED_FIELD, any(p.paraphrased_answer is not None for p in pairs)),
            (PERTURBED_FIELD, any(p.perturbed_answers for p in pairs)),
        )
        if not present
    ]
    what = " and ".join(missing) if missing else f"both {PARAPHRASED_FIELD!r} and {PERTURBED_FIELD!r}"
    raise ConfigError(
        f"{name} needs TOFU's answer variants, but no record of {split}_qa.jsonl has {what} (see "
        "docs/data-format.md; `relapse data synth` writes them, and the TOFU converter keeps them)"
    )


def _tofu_answers(ev: Evaluator, split: str, name: str) -> tuple[list[QAPair], list[AnswerTokens]]:
    pairs = _tofu_pairs(ev, split, name, variants=False)
    scores = ev.answer_scores(f"tofu:{split}:answer", [p.question for p in pairs], [p.answer for p in pairs])
    return pairs, scores


def _tofu_truth_ratios(ev: Evaluator, split: str, name: str) -> tuple[list[QAPair], np.ndarray]:
    """Per-item truth ratios on ``split``: the perturbed answers' against the paraphrase's
    (:func:`relapse.metrics.tofu.truth_ratio`), from one batched pass over all the variants."""
    pairs = _tofu_pairs(ev, split, name, variants=True)
    questions, answers, owner = [], [], []
    for i, pair in enumerate(pairs):
        for text in (pair.paraphrased_answer, *pair.perturbed_answers):
            questions.append(pair.question)
            answers.append(text)
            owner.append(i)
    scores = ev.answer_scores(f"tofu:{split}:variants", questions, answers)
    paraphrased = np.empty(len(pairs))
    perturbed = np.empty(len(pairs))  # per item, the mean over its perturbed answers (aggregate_to_1D)
    position = 0
    for i, pair in enumerate(pairs):
        paraphrased[i] = scores[position].nll
        wrong = [scores[position + 1 + k].nll for k in range(len(pair.perturbed_answers))]
        perturbed[i] = float(np.mean(wrong))
        position += 1 + len(pair.perturbed_answers)
    return pairs, tofu.truth_ratio(paraphrased, perturbed)


def _tofu_mean_result(name: str, per_item: list[dict[str, Any]], key: str, **views: Any) -> dict[str, Any]:
    values = [item[key] for item in per_item]
    return {
        "value": _mean(values),
        "higher_is_better": _direction(name),
        "best": metric_info(name).best,
        "views": {"items": len(per_item), **views},
        "per_item": per_item,
        "item_values": values,
    }


def _tofu_prob(ev: Evaluator, split: str) -> dict[str, Any]:
    name = f"tofu_prob_{split}"
    pairs, answers = _tofu_answers(ev, split, name)
    probabilities = tofu.answer_probability([a.nll for a in answers])
    per_item = [
        {
            "question": pair.question,
            "answer": pair.answer,
            "tokens": int(a.logprobs.size),
            "nll": a.nll,
            "probability": float(p),
        }
        for pair, a, p in zip(pairs, answers, probabilities, strict=True)
    ]
    return _tofu_mean_result(name, per_item, "probability")


def tofu_prob_forget(ev: Evaluator) -> dict[str, Any]:
    """TOFU's forget probability: mean over questions of exp(-mean answer-token NLL) (lower: forgotten)."""
    return _tofu_prob(ev, FORGET)


def tofu_prob_retain(ev: Evaluator) -> dict[str, Any]:
    """TOFU's retain probability: the same on the retain questions (a model utility component)."""
    return _tofu_prob(ev, RETAIN)


def _tofu_truth_ratio(ev: Evaluator, split: str) -> dict[str, Any]:
    name = f"tofu_truth_ratio_{split}"
    return _truth_ratio_result(name, *_tofu_truth_ratios(ev, split, name), closer_to_1=split == FORGET)


def _truth_ratio_result(
    name: str, pairs: list[QAPair], ratios: np.ndarray, closer_to_1: bool
) -> dict[str, Any]:
    if closer_to_1:  # closer_to_1_better: min(tr, 1/tr), as forgotten knowledge gives tr near 1
        scores = np.minimum(ratios, 1.0 / (ratios + tofu.OU_EPS))
        value = tofu.truth_ratio_closer_to_1(ratios)
    else:  # true_better: max(0, 1 - tr), as kept knowledge prefers the true answer
        scores = np.maximum(0.0, 1.0 - ratios)
        value = tofu.truth_ratio_true_better(ratios)
    per_item = [
        {"question": pair.question, "truth_ratio": float(r), "score": float(x)}
        for pair, r, x in zip(pairs, ratios, scores, strict=True)
    ]
    result = _tofu_mean_result(name, per_item, "score", mean_truth_ratio=float(np.mean(ratios)))
    result["value"] = value
    result["truth_ratios"] = [float(r) for r in ratios]
    return result


def tofu_truth_ratio_forget(ev: Evaluator) -> dict[str, Any]:
    """TOFU's forget truth ratio, aggregated as mean(min(tr, 1/tr)) (higher: closer to not knowing)."""
    return _tofu_truth_ratio(ev, FORGET)


def tofu_truth_ratio_retain(ev: Evaluator) -> dict[str, Any]:
    """TOFU's retain truth ratio, aggregated as mean(max(0, 1 - tr)) (higher: the truth still preferred)."""
    return _tofu_truth_ratio(ev, RETAIN)


def forget_truth_ratios(ev: Evaluator) -> list[float]:
    """The per-item forget truth ratios of ``ev``'s model: forget quality's reference when the model is
    the retrained one."""
    return [float(r) for r in _tofu_truth_ratios(ev, FORGET, "tofu_forget_quality")[1]]


def tofu_forget_quality(ev: Evaluator) -> dict[str, Any]:
    """TOFU's forget quality: the p-value of the two-sample KS test between this model's and the retrained
    model's per-item forget truth ratios (higher: the forget set looks as to a model that never saw it)."""
    reference = ev.settings.retrained_truth_ratios
    if reference is None:
        raise ConfigError(
            "tofu_forget_quality needs the retrained model's forget truth ratios: pass --retrained MODEL "
            "(relapse eval), or give the audit a retrained model"
        )
    pairs, ratios = _tofu_truth_ratios(ev, FORGET, "tofu_forget_quality")
    statistic, p_value = tofu.ks_2samp(ratios, reference)
    info = metric_info("tofu_forget_quality")
    return {
        "value": p_value,
        "higher_is_better": info.higher_is_better,
        "best": info.best,
        "views": {"ks_statistic": statistic, "items": len(pairs), "retrained_items": len(reference)},
        "per_item": [
            {"question": pair.question, "truth_ratio": float(r)}
            for pair, r in zip(pairs, ratios, strict=True)
        ],
        # this model's forget truth ratios: the reference of every other cell when it is the retrained one
        "truth_ratios": [float(r) for r in ratios],
    }


def _tofu_memorisation(ev: Evaluator, name: str, score: Callable[[np.ndarray], float]) -> dict[str, Any]:
    pairs, answers = _tofu_answers(ev, FORGET, name)
    per_item = [
        {
            "question": pair.question,
            "answer": pair.answer,
            "tokens": int(a.correct.size),
            "score": score(a.correct),
        }
        for pair, a in zip(pairs, answers, strict=True)
    ]
    return _tofu_mean_result(name, per_item, "score")


def tofu_exact_mem_forget(ev: Evaluator) -> dict[str, Any]:
    """Exact memorisation on the forget set: the share of answer tokens that are the model's argmax under
    teacher forcing, per question, averaged (Tirumala et al. 2022; lower: forgotten)."""
    return _tofu_memorisation(
        ev,
        "tofu_exact_mem_forget",
        lambda correct: float(correct.mean()) if correct.size else float("nan"),
    )


def tofu_extraction_forget(ev: Evaluator) -> dict[str, Any]:
    """Extraction strength on the forget set: 1 - (shortest answer prefix from which the rest comes out
    by greedy teacher-forced prediction) / length, averaged (Carlini et al. 2021; lower: forgotten)."""
    return _tofu_memorisation(ev, "tofu_extraction_forget", tofu.extraction_strength_of)


def _tofu_rouge(ev: Evaluator, name: str, pairs: list[QAPair], key: str) -> dict[str, Any]:
    generated = ev.generate(
        key, [qa_prompt(p.question) for p in pairs], TOFU_MAX_NEW_TOKENS, KNOWMEM_STOP_STRINGS
    )
    return _tofu_mean_result(name, _rouge_items(pairs, generated), "rougeL_recall")


def tofu_rouge_retain(ev: Evaluator) -> dict[str, Any]:
    """TOFU's retain ROUGE: ROUGE-L recall of the greedy answer to each retain question (zero-shot
    prompt) against the answer, averaged (a model utility component, on a 0-1 scale)."""
    name = "tofu_rouge_retain"
    return _tofu_rouge(ev, name, _tofu_pairs(ev, RETAIN, name, variants=False), "tofu_retain")


def _tofu_set(ev: Evaluator, measure: str, name: str) -> dict[str, Any]:
    """``tofu_<measure>_<name>`` on utility QA set ``name``: ROUGE-L recall as on the retain set, or the
    normalised probability or truth ratio (true_better) of each answer against its perturbed answers
    (:func:`relapse.metrics.tofu.option_scores`), from one batched pass over answers and options."""
    metric, pairs = f"tofu_{measure}_{name}", ev.benchmark.utility_qa.get(name)
    if not pairs:
        have = ", ".join(sorted(ev.benchmark.utility_qa)) or "none"
        raise DataError(f"{metric} needs utility_{name}_qa.jsonl (this benchmark's utility QA sets: {have})")
    if measure == "rouge":
        return _tofu_rouge(ev, metric, pairs, f"tofu_utility_{name}")
    texts = [(p.question, text) for p in pairs for text in (p.answer, *p.perturbed_answers)]
    scores = iter(ev.answer_scores(f"tofu:utility:{name}", *zip(*texts, strict=True)))
    nll, wrong = [], []
    for pair in pairs:
        nll.append(next(scores).nll)
        wrong.append([next(scores).nll for _ in pair.perturbed_answers])
    normalised, ratios = tofu.option_scores(nll, wrong)
    if measure == "truth_ratio":
        return _truth_ratio_result(metric, pairs, ratios, closer_to_1=False)
    per_item = [
        {"question": p.question, "answer": p.answer, "nll": x, "normalised_probability": float(v)}
        for p, x, v in zip(pairs, nll, normalised, strict=True)
    ]
    raw = _mean(np.exp(-np.array(nll)))  # open-unlearning's ra_Q_A_Prob / wf_Q_A_Prob
    return _tofu_mean_result(metric, per_item, "normalised_probability", probability=raw)


def tofu_model_utility(ev: Evaluator) -> dict[str, Any]:
    """TOFU's model utility: the harmonic mean of the retain set's answer probability, ROUGE-L recall and
    truth ratio (true_better), and of the same three on each utility QA set (normalised probability
    there): nine values on TOFU, the retain three on a benchmark without utility sets. ``views`` names
    each component with its value, and ``components`` counts them (higher: utility kept; one collapsed
    component sinks it)."""
    parts = tofu_utility_parts(sorted(ev.benchmark.utility_qa))
    components = {part: metric_spec(part)(ev)["value"] for part in parts}
    info = metric_info("tofu_model_utility")
    return {
        "value": tofu.model_utility(list(components.values())),
        "higher_is_better": info.higher_is_better,
        "best": info.best,
        "views": {"components": len(components), **components},
        "per_item": [],
    }


_FIXED: dict[str, Callable[[Evaluator], dict[str, Any]]] = {
    "verbmem_forget": verbmem_forget,
    "knowmem_forget": knowmem_forget,
    "knowmem_retain": knowmem_retain,
    "ppl_general": ppl_general,
    "privleak": privleak,
    "mia_loss": mia_loss,
    "mia_zlib": mia_zlib,
    "mia_lowercase": mia_lowercase,
    "recall_forget": recall_forget,
    "recall_retain": recall_retain,
    "nll_forget": nll_forget,
    "nll_retain": nll_retain,
    "tofu_prob_forget": tofu_prob_forget,
    "tofu_truth_ratio_forget": tofu_truth_ratio_forget,
    "tofu_exact_mem_forget": tofu_exact_mem_forget,
    "tofu_extraction_forget": tofu_extraction_forget,
    "tofu_forget_quality": tofu_forget_quality,
    "tofu_prob_retain": tofu_prob_retain,
    "tofu_rouge_retain": tofu_rouge_retain,
    "tofu_truth_ratio_retain": tofu_truth_ratio_retain,
    "tofu_model_utility": tofu_model_utility,
}


def metric_spec(name: str) -> Callable[[Evaluator], dict[str, Any]]:
    """The function computing metric ``name`` (a :class:`ConfigError` names the choices)."""
    if name in _FIXED:
        return _FIXED[name]
    mink = mink_parameters(name)
    if mink:
        return _mink(*mink)
    tofu_set = tofu_set_parameters(name)
    if tofu_set:
        return lambda ev: _tofu_set(ev, *tofu_set)
    raise ConfigError(
        f"unknown metric {name!r}; choose from groups {', '.join(GROUPS)} or names {', '.join(_FIXED)}, "
        "mia_mink_K, mia_minkpp_K (K in 1..100), tofu_prob_S, tofu_rouge_S, tofu_truth_ratio_S (S a utility "
        "QA set)"
    )


def resolve_metrics(names: str | Sequence[str]) -> list[str]:
    """Metric names from a comma-separated list of names and groups, in order, without repeats."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    resolved: list[str] = []
    for item in filter(None, items):
        for name in GROUPS.get(item, (item,)):
            metric_spec(name)
            if name not in resolved:
                resolved.append(name)
    if not resolved:
        raise ConfigError("no metric named; choose from " + ", ".join(GROUPS))
    return resolved


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    benchmark: Benchmark,
    metrics: str | Sequence[str] = DEFAULT_METRICS,
    settings: EvalSettings | None = None,
) -> dict[str, dict[str, Any]]:
    """Compute ``metrics`` (names or groups) of ``model`` on ``benchmark``."""
    return Evaluator(model, tokenizer, benchmark, settings).run(resolve_metrics(metrics))
