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
================  =====================================================================
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from relapse.data.benchmark import FORGET, GENERAL, HOLDOUT, RETAIN, Benchmark, QAPair, VerbMemItem
from relapse.data.prompts import KNOWMEM_STOP_STRINGS, KnowMemPrompt, derive_verbmem, normalize_answer
from relapse.errors import ConfigError, DataError
from relapse.metrics import mia
from relapse.metrics.catalog import metric_info, mink_parameters
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
}

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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


def _knowmem(ev: Evaluator, pairs: Sequence[QAPair], split: str) -> dict[str, Any]:
    if not pairs:
        raise DataError(f"KnowMem on {split} needs {split}_qa.jsonl with at least one question")
    prompt = KnowMemPrompt.from_meta(ev.benchmark.meta)
    prompts = [prompt.build(p.question, ev.benchmark.icl) for p in pairs]
    generated = ev.generate(
        f"knowmem_{split}", prompts, ev.settings.knowmem_max_new_tokens, KNOWMEM_STOP_STRINGS
    )
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


def _answer_nll(ev: Evaluator, pairs: Sequence[QAPair], higher_is_better: bool | None) -> dict[str, Any]:
    """Mean NLL per answer token of each QA pair under teacher forcing, with the zero-shot prompt.

    A softer view than exact-match recall: it moves before any answer flips, so it shows small
    recoveries (docs/study-smollm2.md reports it beside recall).
    """
    if not pairs:
        raise DataError("answer NLL needs QA pairs")
    from relapse.data.prompts import qa_prompt, qa_text
    from relapse.metrics.scoring import encode_for_scoring, model_max_tokens

    limit = ev.settings.max_tokens or model_max_tokens(ev.model)
    prompts = encode_for_scoring(ev.tokenizer, [qa_prompt(p.question) for p in pairs], limit)
    scores = score_texts(
        ev.model, ev.tokenizer, [qa_text(p) for p in pairs], ev.settings.batch_size, ev.settings.max_tokens
    )
    per_item = []
    for pair, prompt_ids, score in zip(pairs, prompts, scores, strict=True):
        full_ids = score.token_ids.tolist()
        shared = 0  # the prompt's tokens are a prefix of the full text's, up to a merge at the boundary
        while shared < min(len(prompt_ids), len(full_ids)) and prompt_ids[shared] == full_ids[shared]:
            shared += 1
        answer = score.logprobs[max(shared - 1, 0) :]
        per_item.append(
            {
                "question": pair.question,
                "answer": pair.answer,
                "tokens": int(answer.size),
                "nll": float(-answer.mean()) if answer.size else float("nan"),
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
}


def metric_spec(name: str) -> Callable[[Evaluator], dict[str, Any]]:
    """The function computing metric ``name`` (a :class:`ConfigError` names the choices)."""
    if name in _FIXED:
        return _FIXED[name]
    mink = mink_parameters(name)
    if mink:
        return _mink(*mink)
    raise ConfigError(
        f"unknown metric {name!r}; choose from groups {', '.join(GROUPS)} or names {', '.join(_FIXED)}, "
        "mia_mink_K, mia_minkpp_K (K in 1..100)"
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
