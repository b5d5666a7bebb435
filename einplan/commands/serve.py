"""``einplan serve``: an OpenAI-compatible HTTP server over a plan, with continuous batching
(``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/metrics``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from einplan.commands.arguments import non_negative_int, positive_int
from einplan.commands.eval import add_weights_arguments, open_session
from einplan.commands.run import add_draft_arguments, open_draft
from einplan.errors import EinplanError


def run(args: argparse.Namespace) -> None:
    """Load plan, weights and tokenizer; serve until interrupted."""
    from einplan.api import create_server, load_plan, run_server
    from einplan.formats.tokenizer import load_tokenizer
    from einplan.formats.weights import resolve_weights_dir

    for name in ("port", "max_batch", "max_queue", "chunk", "ctx"):
        value = getattr(args, name)
        if value < (0 if name == "port" else 1) or (name == "port" and value > 65535):
            raise EinplanError(f"--{name.replace('_', '-')} out of range: {value}")
    if args.device != "cpu":
        raise EinplanError("einplan serve runs on the cpu for now; leave out --device cuda")
    plan = load_plan(args.plan)
    weights = resolve_weights_dir(args.weights) if args.weights else None
    session = open_session(plan, args, load_tokenizer(args.tokenizer, weights))
    draft = open_draft(args, session.tokenizer)
    model = args.model_name or Path(args.plan).stem
    api_key = args.api_key or os.environ.get("EINPLAN_API_KEY") or None
    app, engine = create_server(
        session,
        model,
        max_batch=args.max_batch,
        ctx=args.ctx,
        max_queue=args.max_queue,
        api_key=api_key,
        chunk=args.chunk,
        draft=draft,
        draft_tokens=args.draft_tokens,
    )
    try:
        print(
            f"einplan: serving {model!r} on http://{args.host}:{args.port}/v1 "
            f"(max batch {args.max_batch}, context {engine.ctx}, KV cache "
            f"{engine.cache_bytes / 2**20:,.0f} MiB)",
            flush=True,
        )
        run_server(app, args.host, args.port, args.log_level)
    finally:
        engine.stop()


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` parser."""
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    s.add_argument("plan", help="plan file from einplan compile")
    add_weights_arguments(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=non_negative_int, default=8000)
    s.add_argument("--model-name", help="the model id clients give (default: the plan's name)")
    s.add_argument("--max-batch", type=positive_int, default=8, help="rows decoded together")
    s.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests before 503")
    s.add_argument(
        "--ctx",
        type=positive_int,
        default=2048,
        help="KV cache slots per row: the longest prompt + completion (default 2048, at most "
        "the plan's limit)",
    )
    s.add_argument(
        "--chunk", type=positive_int, default=256, help="prompt tokens prefilled per step"
    )
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or EINPLAN_API_KEY)")
    s.add_argument(
        "--workers", type=non_negative_int, default=0, help="thread-pool workers (0: sequential)"
    )
    add_draft_arguments(s)
    s.add_argument("--log-level", default="warning", help="uvicorn log level")
    s.set_defaults(func=run)
