"""``relapse attack``: write an attacked copy of a model with attack.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from relapse.cli.common import add_attack_targets, add_common_training, add_overwrite, run_context

HELP = "write an attacked copy of a model (quantized, noised, pruned or relearned)"


def add(commands) -> None:
    from relapse.attacks.registry import EXAMPLES

    p = commands.add_parser(
        "attack",
        help=HELP,
        description="Apply a registered attack to a model and save the result with attack.json. "
        f"Attack names: {', '.join(EXAMPLES)} (see docs/attacks.md). By default only the decoder's linear "
        "layers are changed; embeddings and the LM head stay in full precision.",
    )
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--attack", required=True, help="attack name, e.g. rtn-w4-g128")
    p.add_argument("--out", required=True, type=Path, help="folder to save the attacked model to")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="benchmark folder (relearn-* train on it; GPTQ/AWQ calibrate on it)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="calibration text for GPTQ/AWQ instead of the benchmark's general.jsonl: .jsonl with 'text', "
        "or plain text with one sample per line",
    )
    add_attack_targets(p)
    p.add_argument("--seed", type=int, default=0, help="seed for noise and relearning (default 0)")
    add_overwrite(p, "a different model already in --out")
    add_common_training(p)
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    from relapse.attacks.materialize import materialize

    path, record, cached = materialize(
        args.model,
        args.attack,
        args.out,
        data_dir=args.data,
        include_embeddings=args.include_embeddings,
        include_lm_head=args.include_lm_head,
        seed=args.seed,
        run=run_context(args),
        calibration=args.calibration,
    )
    changed = record["info"].get("quantized") or record["info"].get("rms") or record["info"].get("zeroed")
    what = f"{len(changed)} weight tensors changed" if changed else record["attack_kind"]
    kept = record["info"].get("kept")
    kept_text = f"; kept in full precision: {', '.join(kept)}" if kept else ""
    print(f"{path}: {record['attack']} ({'cached' if cached else what}){kept_text}")
    return 0
