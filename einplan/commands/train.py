"""``einplan train``: train a plan (or a config, compiled first) on a text corpus, with logs,
samples and checkpoints in a run folder; ``--resume`` continues from the latest checkpoint."""

from __future__ import annotations

import argparse
import json

from einplan.commands.arguments import (
    add_attention_argument,
    add_checkpoint_argument,
    non_negative_int,
    positive_int,
)
from einplan.commands.eval import add_kernels_argument, add_profile_argument, check_profile
from einplan.errors import EinplanError


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs of train settings; values are JSON (numbers, true) or text."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise EinplanError(f"--set takes key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args: argparse.Namespace) -> None:
    """Prepare the run, train, and print the summary."""
    from einplan.api import train

    check_profile(args, args.plan, args.data, args.init_weights, args.tokenizer)
    train(
        args.plan,
        data=args.data,
        out=args.out,
        steps=args.steps,
        overrides=parse_overrides(args.set),
        resume=args.resume,
        overwrite=args.overwrite,
        init_weights=args.init_weights,
        tokenizer=args.tokenizer,
        workers=args.workers,
        profile=args.profile,
        kernels=args.kernels,
        compute_dtype=args.compute_dtype,
        checkpoint=args.checkpoint,
        device=args.device,
        cuda_graph=args.cuda_graph,
        tf32=args.tf32,
        attention=args.attention,
        dp=args.dp,
        ray_address=args.ray_address,
        threads_per_worker=args.threads_per_worker,
        max_failures=args.max_failures,
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` parser."""
    t = sub.add_parser("train", help="train a plan on a text corpus, with checkpoints")
    t.add_argument("plan", help="a plan from einplan compile --train, or a config to compile")
    t.add_argument("--data", required=True, help="UTF-8 text corpus")
    t.add_argument("-o", "--out", required=True, help="run folder: logs, checkpoints, tokenizer")
    t.add_argument(
        "--steps", type=positive_int, help="train until this step (default: the settings')"
    )
    t.add_argument(
        "--resume", action="store_true", help="continue from the run folder's latest checkpoint"
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out folder that holds a run, removing its checkpoints, "
        "metrics, loss curve and plan",
    )
    t.add_argument(
        "--compute-dtype",
        choices=["f32", "f64", "bf16", "f16"],
        help="compile a config in this dtype (default: its train section's); bf16 and f16 are "
        "mixed precision (float32 master weights; f16 with dynamic loss scaling)",
    )
    t.add_argument("--init-weights", help="start from pretrained weights (HF folder or file)")
    t.add_argument(
        "--tokenizer", help="tokenizer.json, 'bytes', or 'train' (a BPE learned on the corpus)"
    )
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a train setting for this run (micro_batch=8, lr=1e-3, ...)",
    )
    t.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="thread-pool workers (0: as the plan chose, see its compile summary; 1: none)",
    )
    add_attention_argument(t, "when PLAN is a config ")
    add_checkpoint_argument(t)
    add_kernels_argument(t)
    add_profile_argument(t)
    dp = t.add_argument_group("data-parallel training on Ray (pip install 'einplan[ray]')")
    dp.add_argument(
        "--dp",
        type=positive_int,
        metavar="N",
        help="train on N Ray workers, each accumulating the settings' micro-batches "
        "(N x accumulation per step); a local Ray is started for the run unless --ray-address",
    )
    dp.add_argument(
        "--ray-address", help="an existing Ray cluster: 'auto' on its head node, or HOST:PORT"
    )
    dp.add_argument(
        "--threads-per-worker",
        type=positive_int,
        help="BLAS threads (and CPUs reserved) per worker (default: the cluster's CPUs / N)",
    )
    dp.add_argument(
        "--max-failures",
        type=non_negative_int,
        default=3,
        help="restarts of the worker group from the latest checkpoint when a worker dies",
    )
    t.set_defaults(func=run)
