"""Tiny-model training step and batched generation time with 1 thread vs all cores, in one run.

Prints seconds per step for each thread count and the ratio against 1 thread (the baseline). Run it on
an idle machine; run it again with another busy process to see oversubscription:

    python benchmarks/threads.py [--people 100] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from relapse.data import load_benchmark, synth_benchmark
from relapse.data.batching import EpochSampler, collate, tokenize_for_lm
from relapse.data.prompts import qa_text
from relapse.metrics.qa import qa_recall
from relapse.models import TinyConfig, build_tiny


def measure(threads: int, people: int, steps: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        synth_benchmark(people=people).save(tmp)
        benchmark = load_benchmark(tmp)
    model, tokenizer = build_tiny(TinyConfig(), benchmark, seed=0)
    texts = benchmark.texts("forget+retain") + [qa_text(p) for p in benchmark.qa("forget+retain")]
    examples = tokenize_for_lm(tokenizer, texts, 256)
    sampler = EpochSampler(len(examples), 32, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps are not timed
            started = time.perf_counter()
        loss = model(**collate([examples[i] for i in sampler.indices(step)], tokenizer.pad_token_id)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    step_s = (time.perf_counter() - started) / steps
    started = time.perf_counter()
    qa_recall(model, tokenizer, benchmark.forget_qa + benchmark.retain_qa[:200])
    return step_s, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    counts = sorted({1, cores})
    results = {n: measure(n, args.people, args.steps) for n in counts}
    base_step, base_gen = results[1]
    print(f"cores: {cores}; tiny Llama, batch 32, {args.people} people")
    print(f"{'threads':>7} {'s/step':>8} {'speed-up':>9} {'recall s':>9} {'speed-up':>9}")
    for n, (step_s, gen_s) in results.items():
        print(f"{n:>7} {step_s:>8.3f} {base_step / step_s:>8.2f}x {gen_s:>9.2f} {base_gen / gen_s:>8.2f}x")


if __name__ == "__main__":
    main()
