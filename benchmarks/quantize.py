"""Quantization time and mean KL to the float model's next-token distribution, per scheme, in one run.

On the tiny built-in model (trained, from the cache) and on a random Llama of about 100M parameters:

    python benchmarks/quantize.py [--threads 1] [--skip-large]

KL is measured on held-out general text of the calibration distribution (GPTQ calibrates on the first
128 general texts; KL uses the next 64). The ratio column compares each scheme's KL with RTN w4-g128.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from relapse.attacks import AttackContext, applied, get_attack
from relapse.data import load_benchmark, synth_benchmark
from relapse.models import TinyConfig, build_tiny, load_model
from relapse.runtime import RunContext
from relapse.training.finetune import TrainConfig, train_model

SCHEMES = (
    "rtn-w8-ch",
    "rtn-w4-g128",
    "rtn-w4-g128-sym",
    "rtn-w4-ch",
    "gptq-w4-g128",
    "gptq-w4-g128-act",
    "awq-w4-g128",
    "rtn-w3-g128",
    "gptq-w3-g128",
    "gguf-q8_0",
    "gguf-q4_0",
    "gguf-q4_1",
    "bnb-int8",
    "bnb-nf4",
    "bnb-fp4",
    "noise-like-rtn-w4-g128",
)


def measure(model, tokenizer, benchmark, label: str) -> None:
    batch = tokenizer(benchmark.general[128:192], return_tensors="pt", padding=True, padding_side="right")
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = torch.log_softmax(model(**batch).logits, dim=-1)
    context = AttackContext(tokenizer=tokenizer, benchmark=benchmark)
    results = {}
    for name in SCHEMES:
        started = time.perf_counter()
        try:
            with applied(get_attack(name), model, context), torch.no_grad():
                seconds = time.perf_counter() - started
                log_probs = torch.log_softmax(model(**batch).logits, dim=-1)
        except Exception as exc:  # e.g. bitsandbytes missing: report and go on
            print(f"{label:<12} {name:<24} skipped: {exc}")
            continue
        kl = float((reference.exp() * (reference - log_probs)).sum(-1)[mask].mean())
        results[name] = (seconds, kl)
    base = results.get("rtn-w4-g128", (1.0, 1.0))[1]
    print(f"{'model':<12} {'scheme':<24} {'seconds':>8} {'mean KL':>10} {'KL / rtn-w4-g128':>17}")
    for name, (seconds, kl) in results.items():
        print(f"{label:<12} {name:<24} {seconds:>8.2f} {kl:>10.2e} {kl / base:>16.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synth_benchmark(people=100, general=256).save(data)
        benchmark = load_benchmark(data)
        trained = train_model(
            data, None, TrainConfig(eval_every=50), run=RunContext(threads=args.threads, progress=False)
        )
        model, tokenizer = load_model(trained.path)
        print(f"tiny: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, trained")
        measure(model, tokenizer, benchmark, "tiny")
        if not args.skip_large:
            config = TinyConfig(hidden_size=768, num_layers=14, num_heads=12, intermediate_size=2048)
            model, tokenizer = build_tiny(config, benchmark, seed=0)
            model.eval()
            print(f"random: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, random init")
            measure(model, tokenizer, benchmark, "random-100M")


if __name__ == "__main__":
    main()
