"""The evaluation engine against a one-example-at-a-time loop (the way MUSE's reference evaluation runs).

In one run, on the same model and data, per metric: our batched engine (:mod:`relapse.metrics.engine`)
and a reference loop that calls ``model.generate`` with batch size 1 for every prompt and scores every
text with its own forward pass. Both produce the same numbers (checked here too); the ratio column is the
speed-up. A second part scores text with a ~100M-parameter random Llama and reports the achieved
scoring throughput as a fraction of what one large float32 matrix product reaches on this machine (the
physical limit of the CPU for this work).

    python benchmarks/eval_speed.py [--threads 1] [--people 100] [--skip-large] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from relapse.data import load_benchmark, synth_benchmark
from relapse.data.prompts import KNOWMEM_STOP_STRINGS, KnowMemPrompt
from relapse.metrics.engine import EvalSettings, Evaluator
from relapse.metrics.generation import _cut_at_stop
from relapse.metrics.rouge import rouge_l
from relapse.models import TinyConfig, build_tiny, load_model
from relapse.runtime import RunContext
from relapse.training.finetune import TrainConfig, train_model


def reference_generate(model, tokenizer, prompts, max_new_tokens, stops) -> list[str]:
    """``model.generate`` one prompt at a time, cut at stop strings afterwards (MUSE's loop)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        text = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
        outputs.append(_cut_at_stop(text, stops)[0])
    return outputs


def reference_score(model, tokenizer, texts) -> list[torch.Tensor]:
    """One forward pass per text: token log-probs and the Min-K%++ statistics, as MUSE-style code does."""
    device = next(model.parameters()).device
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        token = log_probs.gather(-1, ids[0, 1:, None])[:, 0]
        mean = (log_probs.exp() * log_probs).sum(-1)
        _ = ((log_probs.exp() * log_probs.square()).sum(-1) - mean.square()).clamp(min=0).sqrt()
        out.append(token.double().cpu())
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    _sync(device)
    started = time.perf_counter()
    value = fn()
    _sync(device)
    return time.perf_counter() - started, value


def compare_tiny(model, tokenizer, benchmark, batch_size) -> None:
    device = next(model.parameters()).device
    prompt = KnowMemPrompt.from_meta(benchmark.meta)
    print(f"{'metric':<22} {'items':>6} {'reference s':>12} {'engine s':>10} {'speed-up':>9}  same output")
    rows = []

    rouge_l("warm up", "the import")  # rouge-score imports nltk on first use: keep that out of the timings
    reference_generate(model, tokenizer, benchmark.forget[:1], 2, ())
    ev = Evaluator(model, tokenizer, benchmark, EvalSettings(batch_size=batch_size))
    items = ev.verbmem_items()
    ref_s, ref = timed(
        lambda: reference_generate(model, tokenizer, [i.prompt for i in items], 128, ()), device
    )
    eng_s, _ = timed(lambda: ev.compute("verbmem_forget"), device)
    same = ref == ev._generations["verbmem"]
    rows.append(("verbmem_forget", len(items), ref_s, eng_s, same))

    for split, pairs in (("forget", benchmark.forget_qa), ("retain", benchmark.retain_qa)):
        prompts = [prompt.build(p.question, benchmark.icl) for p in pairs]
        ref_s, ref = timed(
            lambda p=prompts: reference_generate(model, tokenizer, p, 32, KNOWMEM_STOP_STRINGS), device
        )
        eng_s, _ = timed(lambda s=split: ev.compute(f"knowmem_{s}"), device)
        rows.append(
            (f"knowmem_{split}", len(pairs), ref_s, eng_s, ref == ev._generations[f"knowmem_{split}"])
        )

    texts = benchmark.forget + benchmark.holdout
    ref_s, ref = timed(lambda: reference_score(model, tokenizer, texts), device)
    names = ("mia_loss", "mia_zlib", "mia_mink_40", "mia_minkpp_40", "mia_mink_20", "mia_minkpp_20")
    eng_s, _ = timed(lambda: [ev.compute(n) for n in names], device)
    ours = ev.scores("mia_forget") + ev.scores("mia_holdout")
    diff = max(float((a - torch.from_numpy(b.logprobs)).abs().max()) for a, b in zip(ref, ours, strict=True))
    rows.append((f"mia x{len(names)}", len(texts), ref_s, eng_s, f"max |dlogp| {diff:.1e}"))

    general = benchmark.general
    ref_s, _ = timed(lambda: reference_score(model, tokenizer, general), device)
    eng_s, _ = timed(lambda: ev.compute("ppl_general"), device)
    rows.append(("ppl_general", len(general), ref_s, eng_s, ""))

    for name, count, ref_s, eng_s, same in rows:
        print(f"{name:<22} {count:>6} {ref_s:>12.2f} {eng_s:>10.2f} {ref_s / eng_s:>8.1f}x  {same}")
    total_ref = sum(r[2] for r in rows)
    total_eng = sum(r[3] for r in rows)
    print(f"{'total':<22} {'':>6} {total_ref:>12.2f} {total_eng:>10.2f} {total_ref / total_eng:>8.1f}x")

    # How close the engine's KnowMem (the largest generation job) is to the arithmetic it cannot avoid:
    # 2 x matmul parameters x tokens it must run (every prompt token, every generated token; the LM head
    # once per generated token), against a float32 matrix product of the prefill's own shape.
    retain = [prompt.build(p.question, benchmark.icl) for p in benchmark.retain_qa]
    eng_s = next(r[3] for r in rows if r[0] == "knowmem_retain")
    prompt_tokens = sum(len(tokenizer(text)["input_ids"]) for text in retain)
    new_tokens = sum(len(tokenizer(text)["input_ids"]) for text in ev._generations["knowmem_retain"])
    head = model.lm_head.weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n) - head
    flops = 2 * body * (prompt_tokens + new_tokens) + 2 * head * (len(retain) + new_tokens)
    rows_per_batch = min(64, len(retain)) * round(prompt_tokens / len(retain))
    hidden = model.config.hidden_size
    shaped = linear_flops_per_second(device, rows_per_batch, hidden, model.config.intermediate_size)
    print(
        f"knowmem_retain: {flops / 1e9:.1f} GFLOP of matrix products ({prompt_tokens} prompt and "
        f"{new_tokens} generated tokens); engine {flops / eng_s / 1e9:.1f} GFLOP/s, a "
        f"{rows_per_batch}x{hidden}x{model.config.intermediate_size} linear layer alone "
        f"{shaped / 1e9:.1f} GFLOP/s: the engine runs at {flops / eng_s / shaped:.0%} of it"
    )


def linear_flops_per_second(
    device: torch.device, rows: int, inner: int, outer: int, repeats: int = 50
) -> float:
    x = torch.randn(rows, inner, device=device)
    weight = torch.randn(outer, inner, device=device)
    torch.nn.functional.linear(x, weight)
    seconds, _ = timed(lambda: [torch.nn.functional.linear(x, weight) for _ in range(repeats)], device)
    return 2 * rows * inner * outer * repeats / seconds


def matmul_flops_per_second(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    seconds, _ = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * size**3 * repeats / seconds


def compare_scoring_large(benchmark, device, batch_size) -> None:
    config = TinyConfig(hidden_size=768, num_layers=14, num_heads=12, intermediate_size=2048)
    model, tokenizer = build_tiny(config, benchmark, seed=0)
    model.to(device).eval()
    params = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p.shape[0] != tokenizer.vocab_size)
    params += model.lm_head.weight.numel()
    texts = benchmark.general
    ref_s, _ = timed(lambda: reference_score(model, tokenizer, texts), device)
    ev = Evaluator(model, tokenizer, benchmark, EvalSettings(batch_size=batch_size))
    eng_s, scores = timed(lambda: ev.scores("general"), device)
    tokens = sum(s.n_tokens + 1 for s in scores)
    peak = matmul_flops_per_second(device)
    achieved = 2 * params * tokens / eng_s
    total = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\nrandom {total:.0f}M Llama, scoring {len(texts)} general texts ({tokens} tokens):")
    print(
        f"  reference {ref_s:.2f} s, engine {eng_s:.2f} s: {ref_s / eng_s:.1f}x; "
        f"engine {tokens / eng_s:.0f} tokens/s"
    )
    print(
        f"  matmul peak {peak / 1e9:.1f} GFLOP/s; scoring achieves {achieved / 1e9:.1f} GFLOP/s "
        f"(2 x {params / 1e6:.0f}M matmul parameters x tokens / s) = {achieved / peak:.0%} of it"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--people", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=None, help="engine batch size (default: auto)")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synth_benchmark(people=args.people).save(data)
        benchmark = load_benchmark(data)
        trained = train_model(
            data, None, TrainConfig(eval_every=50), run=RunContext(threads=args.threads, progress=False)
        )
        model, tokenizer = load_model(trained.path)
        model.to(device).eval()
        print(f"tiny trained model on {args.people} people, {device}, {args.threads} thread(s)")
        compare_tiny(model, tokenizer, benchmark, args.batch_size)
        if not args.skip_large:
            compare_scoring_large(benchmark, device, args.batch_size)


if __name__ == "__main__":
    main()
