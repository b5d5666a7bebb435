"""``einplan run``: generate text from a plan, streaming it, then print the phase table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from einplan.commands.arguments import (
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from einplan.commands.eval import (
    add_profile_argument,
    add_weights_arguments,
    check_profile,
    open_session,
)
from einplan.errors import EinplanError


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompt or --prompts-file (one per non-empty line)."""
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise EinplanError(f"prompts file {str(path)!r} not found")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise EinplanError(f"prompts file {path} holds no prompt")
        return prompts
    return [args.prompt]


def run(args: argparse.Namespace) -> None:
    """Load plan, weights and tokenizer; generate for the prompts or chat."""
    from einplan.api import Recorder, load_plan
    from einplan.formats.tokenizer import load_tokenizer
    from einplan.formats.weights import resolve_weights_dir
    from einplan.report.profile import write_profile

    check_profile(args, args.plan, args.weights, args.prompts_file, args.tokenizer, args.adapter)
    out = args.stdout  # the generated text, also under --quiet
    plan = load_plan(args.plan)
    weights = resolve_weights_dir(args.weights) if args.weights else None
    session = open_session(plan, args, load_tokenizer(args.tokenizer, weights))
    recorder = Recorder() if args.profile else None
    draft = open_draft(args, session.tokenizer)

    def generate(prompts: list[str] | list[list[int]], stream: bool):
        on_text = (lambda _, piece: print(piece, end="", flush=True, file=out)) if stream else None
        return session.generate(
            prompts,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=args.stop,
            stream=on_text,
            ctx=args.ctx,
            recorder=recorder,
            **({"draft": draft, "draft_tokens": args.draft_tokens} if draft else {}),
        )

    if args.chat:
        run_chat(session, generate, args.stdout)
    else:
        generate_prompts(args, generate)
    if recorder is not None:
        write_profile(recorder, args.profile)


def open_draft(args: argparse.Namespace, tokenizer):
    """The draft session of --draft (speculative decoding), or None."""
    from einplan.api import Session, load_plan

    if not args.draft:
        if args.draft_weights is not None or args.draft_random_weights is not None:
            raise EinplanError("--draft-weights needs --draft PLAN")
        return None
    if (args.draft_weights is None) == (args.draft_random_weights is None):
        raise EinplanError("--draft needs --draft-weights DIR or --draft-random-weights SEED")
    if args.draft_tokens < 1:
        raise EinplanError(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    return Session(
        load_plan(args.draft),
        args.draft_weights,
        random_seed=args.draft_random_weights,
        workers=args.workers,
        tokenizer=tokenizer,
    )


def generate_prompts(args: argparse.Namespace, generate) -> None:
    """Generate for ``--prompt`` (streamed) or ``--prompts-file`` (in batches), each batch
    followed by its phase table."""
    from einplan.report.generation import print_phase_table

    prompts = read_prompts(args)
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        stream = not args.prompts_file  # a single --prompt streams as it is generated
        if stream:
            print(chunk[0], end="", flush=True, file=args.stdout)
        result = generate(chunk, stream)
        if stream:
            print(file=args.stdout)
        else:
            for prompt, text, why in zip(chunk, result.texts, result.stop_reasons, strict=True):
                print(f"{prompt}{text}\n[stopped: {why}]\n", file=args.stdout)
        print_phase_table(result.stats)
        if args.stats_json:
            write_stats_json(args.stats_json, result.stats)


def write_stats_json(path: str, stats) -> None:
    """The phase table of the last batch as JSON, written atomically."""
    import json
    import os

    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(stats.to_json(), indent=2) + "\n")
    os.replace(tmp, out)


def run_chat(session, generate, out: TextIO) -> None:
    """Read user turns from stdin, answer each with the chat template applied (its text
    holds the special tokens, so it is encoded without adding more)."""
    from einplan.api import render_chat

    messages: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True, file=out)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        text = render_chat(session.tokenizer_config, messages)
        result = generate([session.tokenizer.encode(text, add_special_tokens=False).ids], True)
        print(file=out)
        messages.append({"role": "assistant", "content": result.texts[0]})


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run`` parser."""
    r = sub.add_parser("run", help="generate text with a plan (prefill + decode, KV cache)")
    r.add_argument("plan", help="plan file from einplan compile")
    add_weights_arguments(r)
    add_profile_argument(r)
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument("-p", "--prompt", help="prompt text")
    what.add_argument("--prompts-file", help="one prompt per line, generated in batches")
    what.add_argument("--chat", action="store_true", help="interactive chat (chat template)")
    r.add_argument(
        "-n", "--max-new-tokens", type=positive_int, default=64, help="tokens to generate"
    )
    r.add_argument(
        "--temperature", "--temp", type=non_negative_float, default=0.0, help="0: greedy"
    )
    r.add_argument("--top-k", type=non_negative_int, default=0, help="0: off")
    r.add_argument("--top-p", type=probability, default=1.0, help="nucleus mass (1: off)")
    r.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="1: off")
    r.add_argument("--seed", type=non_negative_int, default=0, help="seed of the sampler")
    r.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    r.add_argument(
        "--batch-size", type=positive_int, default=8, help="prompts per batch (--prompts-file)"
    )
    r.add_argument(
        "--ctx", type=positive_int, help="KV cache length (default: prompt + new tokens)"
    )
    r.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="thread-pool workers (0: as the plan chose, see its compile summary; 1: none)",
    )
    r.add_argument(
        "--stats-json",
        metavar="FILE",
        help="write the phase table (TTFT, tok/s, p50/p99, memory, backend) as JSON",
    )
    add_draft_arguments(r)
    r.set_defaults(func=run)


def add_draft_arguments(p: argparse.ArgumentParser) -> None:
    """``--draft PLAN`` with ``--draft-weights`` or ``--draft-random-weights``, and
    ``--draft-tokens``: speculative decoding."""
    p.add_argument(
        "--draft",
        metavar="PLAN",
        help="speculative decoding: a small draft plan of the same tokenizer proposes tokens "
        "(the target plan needs einplan compile --speculative)",
    )
    p.add_argument("--draft-weights", help="weights of the draft plan")
    p.add_argument(
        "--draft-random-weights", type=non_negative_int, metavar="SEED", help="random draft weights"
    )
    p.add_argument("--draft-tokens", type=positive_int, default=4, help="tokens drafted per step")
