"""``einplan run``: generate text from a plan, streaming it, then print the phase table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from einplan.commands.eval import add_profile_argument, add_weights_arguments, open_session
from einplan.errors import EinplanError


def collect_eos_ids(
    config_eos: list[int], weights: Path | None, tokenizer, tk_cfg: dict
) -> list[int]:
    """EOS ids from the model config, generation_config.json beside the weights, and the
    tokenizer's eos token."""
    ids = set(config_eos)
    if weights is not None and weights.suffix != ".gguf":
        gen = (weights if weights.is_dir() else weights.parent) / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
    eos_text = tk_cfg.get("eos_token")
    if isinstance(eos_text, dict):
        eos_text = eos_text.get("content")
    if eos_text and tokenizer.token_to_id(eos_text) is not None:
        ids.add(tokenizer.token_to_id(eos_text))
    return sorted(ids)


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
    from einplan.api import load_plan
    from einplan.formats.tokenizer import load_tokenizer, load_tokenizer_config
    from einplan.formats.weights import resolve_weights_dir
    from einplan.report.profile import write_profile
    from einplan.runtime.generate import GenerationRequest, Generator
    from einplan.runtime.recorder import Recorder
    from einplan.runtime.sampling import SamplingConfig

    plan = load_plan(args.plan)
    weights = resolve_weights_dir(args.weights) if args.weights else None
    tokenizer = load_tokenizer(args.tokenizer, weights)
    tk_cfg = load_tokenizer_config(weights)
    session = open_session(plan, args)
    generator = Generator(plan, session.weights, args.workers)
    sampling = SamplingConfig(
        args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed
    )
    eos = collect_eos_ids(session.config.eos_token_id, weights, tokenizer, tk_cfg)
    recorder = Recorder() if args.profile else None

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def generate(prompts: list[str], stream: bool, special: bool = True):
        ids = [tokenizer.encode(p, add_special_tokens=special).ids for p in prompts]
        on_text = (lambda _, piece: print(piece, end="", flush=True)) if stream else None
        request = GenerationRequest(ids, args.max_new_tokens, sampling, eos, args.stop, args.ctx)
        return generator.generate(request, decode, on_text, recorder)

    if args.chat:
        run_chat(tk_cfg, generate)
    else:
        generate_prompts(args, generate)
    if recorder is not None:
        write_profile(recorder, args.profile)


def generate_prompts(args: argparse.Namespace, generate) -> None:
    """Generate for ``--prompt`` (streamed) or ``--prompts-file`` (in batches), each batch
    followed by its phase table."""
    from einplan.report.generation import print_phase_table

    prompts = read_prompts(args)
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        stream = not args.prompts_file  # a single --prompt streams as it is generated
        if stream:
            print(chunk[0], end="", flush=True)
        result = generate(chunk, stream)
        if stream:
            print()
        else:
            for prompt, text, why in zip(chunk, result.texts, result.stop_reasons, strict=True):
                print(f"{prompt}{text}\n[stopped: {why}]\n")
        print_phase_table(result.stats)


def run_chat(tk_cfg: dict, generate) -> None:
    """Read user turns from stdin, answer each with the chat template applied."""
    from einplan.apps.chat import render_chat

    messages: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        result = generate([render_chat(tk_cfg, messages)], stream=True, special=False)
        print()
        messages.append({"role": "assistant", "content": result.texts[0]})


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run`` parser."""
    r = sub.add_parser("run", help="generate text with a plan (prefill + decode, KV cache)")
    r.add_argument("plan", help="plan file from einplan compile")
    add_weights_arguments(r)
    add_profile_argument(r)
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt text")
    what.add_argument("--prompts-file", help="one prompt per line, generated in batches")
    what.add_argument("--chat", action="store_true", help="interactive chat (chat template)")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    r.add_argument("--top-k", type=int, default=0, help="0: off")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--repetition-penalty", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    r.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    r.add_argument("--batch-size", type=int, default=8, help="prompts per batch (--prompts-file)")
    r.add_argument("--ctx", type=int, help="KV cache length (default: prompt + new tokens)")
    r.add_argument("--workers", type=int, default=0, help="thread-pool workers (0: sequential)")
    r.set_defaults(func=run)
