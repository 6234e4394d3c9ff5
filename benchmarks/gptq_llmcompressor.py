"""Our GPTQ against llm-compressor's on the same random Llama and calibration text: time and mean KL.

    python benchmarks/gptq_llmcompressor.py [--device cuda] [--threads 1] [--skip-large] [--awq]

Why: ``gptq-w4-g128`` is our own implementation; llm-compressor's ``GPTQModifier`` is what deployers
run. Both quantize the decoder's linear layers to 4 bits in asymmetric groups of 128, calibrated on the
same 128 general texts of a synthetic benchmark (ours in padded batches that skip the padding,
llm-compressor one text per batch, so both see the same tokens); the mean KL of the next-token
distribution to the float model's is measured on the next 64 texts. RTN w4-g128 is the baseline for KL,
our GPTQ the baseline for time. ``--awq`` adds both AWQs.

Models: the default tiny Llama (about 3.8M parameters) and the ~100M Llama of ``benchmarks/quantize.py``,
both randomly initialised. llm-compressor pins its own transformers, so run this where it is installed in
a separate virtual environment (``pip install llmcompressor``, then relapse with ``--no-deps``);
without it the llm-compressor rows say "skipped" and the rest still runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import tempfile
import time
from pathlib import Path

import torch

from relapse.attacks import AttackContext, applied, get_attack
from relapse.data import load_benchmark, synth_benchmark
from relapse.errors import ConfigError
from relapse.models import TinyConfig, build_tiny

#: The ~100M random Llama of benchmarks/quantize.py.
LARGE = TinyConfig(hidden_size=768, num_layers=14, num_heads=12, intermediate_size=2048)
SCHEMES = ("rtn-w4-g128", "gptq-w4-g128", "llmc-gptq-w4-g128")
AWQ_SCHEMES = ("awq-w4-g128", "llmc-awq-w4-g128")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, tokenizer, benchmark, label: str, device: torch.device, schemes: tuple[str, ...]) -> None:
    """Time each attack's ``apply`` and the mean KL of the attacked model to the float model."""
    batch = tokenizer(benchmark.general[128:192], return_tensors="pt", padding=True, padding_side="right")
    batch = {k: v.to(device) for k, v in batch.items()}
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = torch.log_softmax(model(**batch).logits.float(), dim=-1)
    context = AttackContext(tokenizer=tokenizer, benchmark=benchmark)
    results = {}
    for name in schemes:
        _sync(device)
        started = time.perf_counter()
        try:
            with applied(get_attack(name), model, context), torch.no_grad():
                _sync(device)
                seconds = time.perf_counter() - started
                log_probs = torch.log_softmax(model(**batch).logits.float(), dim=-1)
        except ConfigError as exc:  # llm-compressor not installed: say so and go on
            print(f"{label:<12} {name:<20} skipped: {exc}")
            continue
        kl = float((reference.exp() * (reference - log_probs)).sum(-1)[mask].mean())
        results[name] = (seconds, kl)
    base_kl = results.get("rtn-w4-g128", (1.0, 1.0))[1]
    base_time = results.get("gptq-w4-g128", (1.0, 1.0))[0]
    print(f"{'model':<12} {'scheme':<20} {'seconds':>8} {'time / gptq':>12} {'mean KL':>10} {'KL / rtn':>9}")
    for name, (seconds, kl) in results.items():
        print(
            f"{label:<12} {name:<20} {seconds:>8.2f} {seconds / base_time:>11.2f}x "
            f"{kl:>10.3e} {kl / base_kl:>8.3f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both quantizers run there)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-large", action="store_true", help="only the ~3.8M model")
    parser.add_argument("--awq", action="store_true", help="also our AWQ and llm-compressor's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    schemes = SCHEMES + (AWQ_SCHEMES if args.awq else ())
    print(
        f"device {device}, {args.threads} thread(s); torch {torch.__version__}, transformers "
        f"{_version('transformers')}, llmcompressor {_version('llmcompressor')}"
    )
    try:  # import once outside the timings (llm-compressor's import takes seconds)
        from relapse.attacks.llmcompressor import require_llmcompressor

        require_llmcompressor()
    except ConfigError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synth_benchmark(people=100, general=256).save(data)
        benchmark = load_benchmark(data)
    configs = [("tiny", TinyConfig())] + ([] if args.skip_large else [("random-100M", LARGE)])
    for label, config in configs:
        model, tokenizer = build_tiny(config, benchmark, seed=0)
        model.to(device).eval()
        print(f"{label}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random init")
        measure(model, tokenizer, benchmark, label, device, schemes)


if __name__ == "__main__":
    main()
