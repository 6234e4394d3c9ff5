"""Writing an attacked model to disk (``relapse attack``) and diffing two models (``relapse diff``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relapse.attacks.base import AttackContext, weight_targets
from relapse.attacks.calibration import read_calibration_file
from relapse.attacks.diagnostics import weight_diagnostics
from relapse.attacks.registry import get_attack
from relapse.attacks.rtn import parse_rtn_name
from relapse.data.benchmark import benchmark_files, load_benchmark
from relapse.models.cached_run import open_cached_run
from relapse.models.io import load_model, model_identity, save_model
from relapse.runtime import (
    RunContext,
    hash_files,
    resolve_device,
    stable_hash,
)

RECORD_NAME = "attack.json"


def materialize(
    model: str,
    attack_name: str,
    out: str | Path,
    data_dir: str | Path | None = None,
    include_embeddings: bool = False,
    include_lm_head: bool = False,
    seed: int = 0,
    calibration: str | Path | None = None,
    run: RunContext | None = None,
) -> tuple[Path, dict[str, Any], bool]:
    """Apply ``attack_name`` to ``model`` and save the attacked model with ``attack.json``.

    Returns ``(path, record, cached)``; an ``out`` already holding this exact result is returned as is.
    The attack runs on ``run.device`` (``auto``: a GPU when there is one); the device is recorded but is
    not part of the cache key, like the thread count.
    """
    run = run or RunContext()
    attack = get_attack(attack_name)
    target = resolve_device(run.device)
    calibration_texts = read_calibration_file(calibration) if calibration else []
    key = stable_hash(
        {
            "model": model_identity(str(model)),
            "attack": attack.name,
            "data": hash_files(benchmark_files(Path(data_dir))) if data_dir else None,
            "embeddings": include_embeddings,
            "lm_head": include_lm_head,
            "seed": seed,
            "calibration": stable_hash(calibration_texts) if calibration_texts else None,
        }
    )
    opened = open_cached_run(out, key, RECORD_NAME, run.overwrite)
    if opened.cached:
        return opened.out, opened.existing, True
    opened.start(run.threads, seed)
    net, tokenizer = load_model(str(model), device=str(target))
    context = AttackContext(
        tokenizer=tokenizer,
        benchmark=load_benchmark(data_dir) if data_dir else None,
        include_embeddings=include_embeddings,
        include_lm_head=include_lm_head,
        seed=seed,
        progress=run.progress,
        calibration_texts=calibration_texts,
    )
    info = attack.apply(net, context)
    record = {
        "kind": "relapse-attack",
        "cache_key": key,
        "attack": attack.name,
        "attack_kind": attack.kind,
        "model": str(model),
        "model_identity": model_identity(str(model)),
        **opened.provenance(seed, target),
        "info": info,
    }
    save_model(net, tokenizer, opened.out, record, RECORD_NAME)
    return opened.out, record, False


def diff_models(
    a: str, b: str, attack_name: str, include_embeddings: bool = False, include_lm_head: bool = False
) -> dict[str, Any]:
    """Weight diagnostics of B relative to A under the RTN quantizer ``attack_name``."""
    scheme = parse_rtn_name(attack_name.removeprefix("noise-like-"))
    model_a, _ = load_model(a)
    model_b, _ = load_model(b)
    context = AttackContext(include_embeddings=include_embeddings, include_lm_head=include_lm_head)
    names = sorted(weight_targets(model_a, context))
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    report = weight_diagnostics(state_a, state_b, names, scheme)
    return {"a": a, "b": b, **report}
