"""``relapse plan``: memory per GPU for unlearning a model, from its config.json alone."""

from __future__ import annotations

import argparse

HELP = "memory per GPU for unlearning a model, per sharding strategy and precision (no weights loaded)"


def add(commands) -> None:
    p = commands.add_parser(
        "plan",
        help=HELP,
        description="Count a Llama-family model's parameters from its config.json alone and print, per "
        "strategy (data parallel, ZeRO-2, FSDP full shard / ZeRO-3, LoRA) and precision (float32, bfloat16 "
        "with float32 master weights, pure bfloat16), the memory each GPU holds while unlearning: weights, "
        "gradients, AdamW state and the activations of one micro-batch. See docs/scale.md.",
    )
    p.add_argument(
        "model", help="a preset (llama-2-7b, llama-3.1-8b, smollm2-135m), a model folder or a config.json"
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs the work is sharded over (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch per GPU (default 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument(
        "--no-checkpointing", action="store_true", help="without gradient checkpointing (more activations)"
    )
    p.add_argument(
        "--gpu-memory", type=float, default=80.0, help="GiB per GPU, for the fits column (default 80)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    import json

    from relapse.models.plan import load_architecture, plan_json, plan_memory, plan_table

    arch, source = load_architecture(args.model)
    settings = {
        "gpus": args.gpus,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lora_rank": args.lora_r,
        "checkpointing": not args.no_checkpointing,
        "gpu_memory_gb": args.gpu_memory,
    }
    rows = plan_memory(arch, **settings)
    if args.json:
        print(json.dumps(plan_json(arch, source, rows, settings), indent=2))
    else:
        print(plan_table(arch, source, rows, args.gpu_memory))
    return 0
