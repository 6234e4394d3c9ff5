"""GPU check: relapse's pipeline on CUDA, beside the same pipeline on the CPU, with PASS/FAIL lines.

On a small synthetic benchmark it trains a tiny target (a fixed number of steps), unlearns it with
npo+gdr, npo+gdr with SURE and npo+klr (precomputed reference on the device), audits the results under
rtn-w4-g128, gptq-w4-g128, bnb-nf4 (skipped without bitsandbytes) and relearn-retain-5, once on the GPU
and once on the CPU, and prints the numbers side by side. It then checks, on the GPU:

- every model forward ran on the GPU, with its input ids there too (a global forward hook), and every
  record (train.json, unlearn.json, results.json and each of its cells) names the GPU;
- each attack is undone bit for bit (relapse.attacks.applied) and leaves no gradients behind;
- greedy generation gives the same text at batch sizes 1, 7 and 64, and scoring agrees to 1e-4;
- a checkpoint written on the GPU holds CPU tensors, and a run resumed from it matches an uninterrupted
  one; cache keys do not depend on the device; the first training loss is the same on both devices.
- RTN and GGUF round the same weights identically on the GPU and the CPU (bitsandbytes, which runs its
  own CUDA kernels there, is compared and printed).

CPU and GPU weights are not expected to be bit-identical (different kernels, and Adam amplifies the last
bits over many steps): their differences are printed, not judged.

    python benchmarks/gpu_check.py [--out DIR] [--device cuda] [--compare-on cpu] [--train-steps 150]

Exit status 0 when every check passed (about 90 s on an H200, half of it the CPU reference run).
``--device cpu`` runs the script's own logic on a machine without a GPU (everything on the CPU twice);
only a CUDA device checks anything about CUDA. Without an installed relapse, run it from the repository
root with ``PYTHONPATH=src``; the metrics need rouge-score (and nltk), the bnb rows bitsandbytes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from relapse.runtime import RunContext

RESULTS: list[tuple[str, str, str]] = []  # (status, name, detail)


def check(name: str, passed: bool, detail: str = "") -> bool:
    """Record and print one PASS/FAIL line."""
    status = "PASS" if passed else "FAIL"
    RESULTS.append((status, name, detail))
    print(f"{status} {name}" + (f": {detail}" if detail else ""), flush=True)
    return passed


def guarded(name: str, body: Callable[[], None]) -> None:
    """Run one group of checks; an exception is a FAIL with its last traceback lines, not the end."""
    try:
        body()
    except Exception as exc:  # a check that crashes must not hide the others
        lines = traceback.format_exc().strip().splitlines()
        check(name, False, f"{type(exc).__name__}: {exc} | " + " / ".join(lines[-4:-1]))


class DeviceWatch:
    """Which devices model forwards ran on: a global forward pre-hook notes the device of every
    embedding lookup's weights and input ids (the model's first step, whatever the call path)."""

    def __init__(self) -> None:
        self.weights: set[str] = set()
        self.inputs: set[str] = set()
        self.calls = 0
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, torch.nn.Embedding):
            self.calls += 1
            self.weights.add(str(module.weight.device))
            if args and isinstance(args[0], torch.Tensor):
                self.inputs.add(str(args[0].device))

    def reset(self) -> None:
        self.weights, self.inputs, self.calls = set(), set(), 0


def state_on_cpu(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def number(value: Any) -> str:
    return f"{value:>10.4g}" if isinstance(value, float | int) and value is not None else f"{'-':>10}"


def pipeline(device: str, data: Path, out: Path, args, bnb: bool, watch: DeviceWatch) -> dict[str, Any]:
    """Train, unlearn and audit on ``device``; returns paths, records and timings."""
    from relapse.audit.sweep import AuditConfig, run_audit
    from relapse.methods.unlearn import UnlearnConfig, unlearn_model
    from relapse.training.finetune import TrainConfig, train_model

    watch.reset()
    started = time.perf_counter()
    run: dict[str, Any] = {"device": device, "unlearned": {}}
    config = TrainConfig(
        max_steps=args.train_steps, eval_every=50, checkpoint_every=50, stop_recall=None, seed=1
    )
    run["target"] = train_model(data, out / "target", config, run=RunContext(progress=False, device=device))
    common = {"max_steps": args.unlearn_steps, "eval_every": args.unlearn_steps, "batch_size": 8}
    methods = {
        "npo+gdr": UnlearnConfig(method="npo+gdr", lr=1e-4, alpha=1.0, **common),
        "sure": UnlearnConfig(method="npo+gdr", lr=1e-3, sure_top=0.1, **common),
        "npo+klr": UnlearnConfig(method="npo+klr", lr=1e-4, **common),
        "npo-bf16-autocast": UnlearnConfig(method="npo", lr=1e-4, autocast_bf16=True, **common),
    }
    for label, unlearn_config in methods.items():
        run["unlearned"][label] = unlearn_model(
            run["target"].path,
            data,
            out / label,
            unlearn_config,
            run=RunContext(progress=False, device=device),
        )
    attacks = ["rtn-w4-g128", "gptq-w4-g128", *(["bnb-nf4"] if bnb else []), "relearn-retain-5"]
    audit = AuditConfig(
        target=str(run["target"].path),
        unlearned=[str(run["unlearned"][label].path) for label in ("npo+gdr", "sure")],
        data=str(data),
        attacks=attacks,
        metrics=["verbmem_forget", "knowmem_forget", "recall_forget", "recall_retain", "mia_loss"],
        labels={str(run["unlearned"][label].path): label for label in ("npo+gdr", "sure")}
        | {str(run["target"].path): "target"},
        device=device,
    )
    run["audit"] = run_audit(audit, out / "audit", run=RunContext(progress=False, log=None))
    run["seconds"] = time.perf_counter() - started
    run["forward_weights"], run["forward_inputs"], run["forwards"] = watch.weights, watch.inputs, watch.calls
    print(f"{device}: pipeline took {run['seconds']:.1f} s ({watch.calls} embedding lookups)", flush=True)
    return run


def check_records(run: dict[str, Any], device: str) -> None:
    devices = {"train.json": run["target"].record["device"]}
    for label, result in run["unlearned"].items():
        devices[f"unlearn.json {label}"] = result.record["device"]
    devices["results.json"] = run["audit"]["device"]
    devices |= {f"cell {key}": cell["device"] for key, cell in run["audit"]["cells"].items()}
    wrong = {k: v for k, v in devices.items() if v != device}
    check(
        f"records name {device}",
        not wrong,
        f"{len(devices)} records" + (f"; wrong: {wrong}" if wrong else ""),
    )
    check(
        f"every model forward ran on {device}",
        run["forward_weights"] == {device} and run["forward_inputs"] == {device} and run["forwards"] > 0,
        f"weights on {sorted(run['forward_weights'])}, input ids on {sorted(run['forward_inputs'])}",
    )


def check_attacks_restore(model_path: Path, data: Path, device: str, bnb: bool) -> None:
    """Every attack changes the weights inside ``applied`` and restores them bit for bit after."""
    from relapse.attacks.base import AttackContext, applied
    from relapse.attacks.registry import get_attack
    from relapse.data.benchmark import load_benchmark
    from relapse.models.io import load_model

    net, tokenizer = load_model(str(model_path), device=device)
    context = AttackContext(tokenizer=tokenizer, benchmark=load_benchmark(data), seed=0)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    names = ["rtn-w4-g128", "gptq-w4-g128", "awq-w4-g128", "gguf-q4_0", "noise-like-rtn-w4-g128", "prune-30"]
    names += ["relearn-retain-5", *(["bnb-nf4", "bnb-int8"] if bnb else [])]
    for name in names:
        attack = get_attack(name)
        with applied(attack, net, context):
            changed = sum(not torch.equal(before[k], v) for k, v in net.state_dict().items())
            on_device = {str(p.device) for p in net.parameters()}
        after = net.state_dict()
        exact = all(torch.equal(before[k], after[k]) for k in before)
        no_grads = all(p.grad is None for p in net.parameters())
        check(
            f"{name} on {device}: changed then restored bit for bit",
            changed > 0 and exact and no_grads and on_device == {device},
            f"{changed} tensors changed, weights on {sorted(on_device)}, grads cleared: {no_grads}",
        )


def check_batch_invariance(model_path: Path, data: Path, device: str) -> None:
    from relapse.data.benchmark import load_benchmark
    from relapse.data.prompts import qa_prompt
    from relapse.metrics.generation import greedy_generate
    from relapse.metrics.scoring import score_texts
    from relapse.models.io import load_model

    net, tokenizer = load_model(str(model_path), device=device)
    benchmark = load_benchmark(data)
    prompts = [qa_prompt(p.question) for p in benchmark.forget_qa + benchmark.retain_qa]
    prompts += [item.prompt for item in benchmark.verbmem][:20]
    outputs = {size: greedy_generate(net, tokenizer, prompts, 48, batch_size=size) for size in (1, 7, 64)}
    differing = sum(a != b or a != c for a, b, c in zip(outputs[1], outputs[7], outputs[64], strict=True))
    check(
        f"greedy generation identical at batch sizes 1, 7, 64 on {device}",
        differing == 0,
        f"{len(prompts)} prompts, {differing} differ",
    )
    texts = benchmark.forget[:16] + benchmark.general[:16]
    one = score_texts(net, tokenizer, texts, batch_size=1)
    many = score_texts(net, tokenizer, texts, batch_size=32)
    worst = max(float(abs(a.logprobs - b.logprobs).max()) for a, b in zip(one, many, strict=True))
    check(
        f"token log-probs agree between batch sizes 1 and 32 on {device}",
        worst < 1e-4,
        f"max |diff| {worst:.2e}",
    )


def check_checkpoint_resume(target_path: Path, data: Path, work: Path, device: str) -> None:
    """Kill a short run after its checkpoint, resume it on ``device``, compare with an uninterrupted run."""
    from relapse.data.batching import EpochSampler, collate, tokenize_for_lm
    from relapse.data.benchmark import load_benchmark
    from relapse.models.io import load_model
    from relapse.training.loop import CHECKPOINT_DIR, LoopConfig, run_loop

    benchmark = load_benchmark(data)
    _, tokenizer = load_model(str(target_path))
    examples = tokenize_for_lm(tokenizer, benchmark.retain, 128)
    sampler = EpochSampler(len(examples), 8, 0)
    config = LoopConfig(lr=1e-4, max_steps=6, batch_size=8, eval_every=100, checkpoint_every=3)

    def batch_for_step(step: int, micro: int) -> dict[str, torch.Tensor]:
        return collate([examples[i] for i in sampler.indices(step)], tokenizer.pad_token_id)

    def loss_fn(model, batch):
        return model(**batch).loss, {}

    class Killed(Exception):
        pass

    def run(work_dir: Path | None, kill_at: int | None) -> torch.nn.Module:
        net, _ = load_model(str(target_path), device=device)
        steps = [0]

        def after_step() -> None:
            steps[0] += 1
            if kill_at is not None and steps[0] == kill_at:
                raise Killed

        with contextlib.suppress(Killed):
            run_loop(
                net,
                config,
                batch_for_step,
                loss_fn,
                run_key="k",
                work_dir=work_dir,
                progress=False,
                after_step=after_step,
            )
        return net

    straight = run(None, None)
    run(work, kill_at=5)  # the checkpoint of step 3 stays behind
    saved = torch.load(work / CHECKPOINT_DIR / "optimizer.pt", map_location=None, weights_only=True)
    devices = {
        str(t.device) for s in saved["state"].values() for t in s.values() if isinstance(t, torch.Tensor)
    }
    check(
        "checkpoint optimizer state is stored on the CPU", devices == {"cpu"}, f"tensors on {sorted(devices)}"
    )
    resumed = run(work, None)
    a, b = straight.state_dict(), resumed.state_dict()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    on_device = {str(p.device) for p in resumed.parameters()}
    check(
        f"a run resumed on {device} matches an uninterrupted one",
        diff < 1e-5 and on_device == {device},
        f"max |diff| {diff:.2e} ({'bit-identical' if diff == 0 else 'float tolerance'}), weights on "
        f"{sorted(on_device)}",
    )


def compare_side_by_side(gpu: dict[str, Any], cpu: dict[str, Any], bnb: bool) -> None:
    """Weights and numbers of the two runs, printed; the judged checks are the ones that must hold."""
    print(f"\n--- {gpu['device']} vs {cpu['device']} ---")
    g_target, c_target = gpu["target"].record, cpu["target"].record
    check(
        "cache keys do not depend on the device",
        g_target["cache_key"] == c_target["cache_key"]
        and all(
            gpu["unlearned"][k].record["cache_key"] == cpu["unlearned"][k].record["cache_key"]
            for k in gpu["unlearned"]
        ),
    )
    first_g, first_c = g_target["loss_curve"][0], c_target["loss_curve"][0]
    check(
        "the first training loss is the same on both devices (same data, init and loss)",
        abs(first_g - first_c) <= 1e-4 * max(1.0, abs(first_c)),
        f"{first_g:.6f} vs {first_c:.6f}",
    )
    print(f"{'model':<20} {'max|dW| gpu-cpu':>16} {'final loss gpu':>15} {'final loss cpu':>15}")
    pairs = [("target", gpu["target"], cpu["target"])]
    pairs += [(k, gpu["unlearned"][k], cpu["unlearned"][k]) for k in gpu["unlearned"]]
    for label, g, c in pairs:
        diff = max_abs_diff(state_on_cpu(g.path), state_on_cpu(c.path))
        g_loss, c_loss = g.record["loss_curve"][-1], c.record["loss_curve"][-1]
        print(f"{label:<20} {diff:>16.3e} {g_loss:>15.5f} {c_loss:>15.5f}")
    print(f"\n{'model':<20} {'final recall gpu':>22} {'final recall cpu':>22}")
    for label, g, c in pairs[1:]:
        gf, cf = g.record["final"], c.record["final"]
        print(
            f"{label:<20} {gf['recall_forget']:>10.3f}/{gf['recall_retain']:<11.3f} "
            f"{cf['recall_forget']:>10.3f}/{cf['recall_retain']:<11.3f}  (forget/retain)"
        )
    print(f"\n{'cell':<34} {'metric':<16} {'gpu':>10} {'cpu':>10}")
    for key, cell in gpu["audit"]["cells"].items():
        other = cpu["audit"]["cells"].get(key, {}).get("metrics", {})
        for metric, result in cell["metrics"].items():
            c_value = other.get(metric, {}).get("value")
            print(f"{key:<34} {metric:<16} {number(result['value'])} {number(c_value)}")
    print("\nverdicts:")
    for label in gpu["audit"].get("verdicts", {}):
        print(f"  {label:<10} gpu: {gpu['audit']['verdicts'][label]['text']}")
        print(f"  {'':<10} cpu: {cpu['audit']['verdicts'].get(label, {}).get('text')}")
    print(
        f"\n{gpu['device']} pipeline {gpu['seconds']:.1f} s, {cpu['device']} pipeline {cpu['seconds']:.1f} s"
    )


def compare_rounding(model_path: Path, gpu_device: str, bnb: bool) -> None:
    """The same weights rounded on each device. relapse's own grids (RTN, GGUF) must agree exactly;
    bitsandbytes runs its own CUDA kernels on a GPU, so its differences are printed, not judged."""
    from relapse.attacks.deploy import bnb_fake_quantize, gguf_fake_quantize
    from relapse.attacks.rtn import QuantScheme, fake_quantize
    from relapse.models.io import load_model
    from relapse.models.parts import decoder_linear_weights

    state = state_on_cpu(model_path)
    net, _ = load_model(str(model_path))
    names = list(decoder_linear_weights(net))
    rounders = {
        "rtn-w4-g128": lambda w: fake_quantize(w, QuantScheme(4, 128)),
        "rtn-w8-ch": lambda w: fake_quantize(w, QuantScheme(8, None)),
        "rtn-w4-g32-sym": lambda w: fake_quantize(w, QuantScheme(4, 32, symmetric=True)),
        "gguf-q4_0": lambda w: gguf_fake_quantize(w, "q4_0"),
        "gguf-q4_1": lambda w: gguf_fake_quantize(w, "q4_1"),
        "gguf-q8_0": lambda w: gguf_fake_quantize(w, "q8_0"),
    }
    if bnb:
        rounders["bnb-nf4"] = lambda w: bnb_fake_quantize(w, "nf4")
        rounders["bnb-int8"] = lambda w: bnb_fake_quantize(w, "int8")
    print("\nrounding the same weights on each device:")
    for name, rounder in rounders.items():
        differing, worst, total = 0, 0.0, 0
        for tensor_name in names:
            w = state[tensor_name]
            on_cpu, on_gpu = rounder(w), rounder(w.to(gpu_device)).cpu()
            differing += int((on_cpu != on_gpu).sum())
            worst = max(worst, float((on_cpu - on_gpu).abs().max()))
            total += w.numel()
        detail = f"{differing}/{total} elements differ, max |diff| {worst:.3e}"
        if name.startswith("bnb-"):
            print(f"  {name}: {detail} (bitsandbytes' own kernels)")
        else:
            check(f"{name} rounds identically on {gpu_device} and the CPU", differing == 0, detail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--device", default="cuda", help="the device under test (default cuda)")
    parser.add_argument("--compare-on", default="cpu", help="the reference device (default cpu)")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--unlearn-steps", type=int, default=20)
    parser.add_argument("--skip-compare", action="store_true", help="run on --device only")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        os.environ["RELAPSE_CACHE"] = str(root / "cache")  # never the user's cache
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        from relapse.data import synth_benchmark
        from relapse.runtime import package_versions, resolve_device

        device = str(resolve_device(args.device))
        reference = str(resolve_device(args.compare_on))
        print(f"device under test: {device}; reference: {reference}; versions: {package_versions()}")
        if device.startswith("cuda"):
            print(f"GPU: {torch.cuda.get_device_name(device)}; torch CUDA {torch.version.cuda}")
        bnb = importlib.util.find_spec("bitsandbytes") is not None
        if not bnb:
            print("SKIP bnb-nf4 and bnb-int8: bitsandbytes is not installed")
        data = root / "data"
        synth_benchmark(people=20, facts_per_person=3, forget_frac=0.2, seed=7).save(data)
        watch = DeviceWatch()
        runs: dict[str, dict[str, Any]] = {}

        def under_test() -> None:
            runs["test"] = pipeline(device, data, root / "test", args, bnb, watch)
            check_records(runs["test"], device)

        guarded(f"pipeline on {device}", under_test)
        watch.reset()
        if "test" in runs:
            sure = runs["test"]["unlearned"]["sure"]
            check(
                f"SURE mask held on {device}",
                bool(sure.record["sure"]["frozen_elements_identical"]),
                f"{sure.record['sure']['trainable_share']:.1%} of weights trainable",
            )
            model = runs["test"]["unlearned"]["npo+gdr"].path
            guarded("attacks restore", lambda: check_attacks_restore(model, data, device, bnb))
            guarded("batch invariance", lambda: check_batch_invariance(model, data, device))
            work = root / "resume"
            target = runs["test"]["target"].path
            guarded("checkpoint resume", lambda: check_checkpoint_resume(target, data, work, device))
            check(
                f"no forward left {device} during the checks",
                watch.weights <= {device} and watch.inputs <= {device},
                f"weights on {sorted(watch.weights)}, input ids on {sorted(watch.inputs)}",
            )
        if not args.skip_compare:
            watch.reset()
            guarded(
                f"pipeline on {reference}",
                lambda: runs.update(ref=pipeline(reference, data, root / "ref", args, bnb, watch)),
            )
            if "test" in runs and "ref" in runs:
                guarded("side by side", lambda: compare_side_by_side(runs["test"], runs["ref"], bnb))
                model = runs["test"]["unlearned"]["npo+gdr"].path
                guarded("rounding", lambda: compare_rounding(model, device, bnb))
        watch.handle.remove()
        if args.out:
            summary = [{"status": s, "check": n, "detail": d} for s, n, d in RESULTS]
            (root / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    failed = [name for status, name, _ in RESULTS if status == "FAIL"]
    print(f"\n{len(RESULTS) - len(failed)} PASS, {len(failed)} FAIL in {time.perf_counter() - started:.0f} s")
    for name in failed:
        print(f"FAIL {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
