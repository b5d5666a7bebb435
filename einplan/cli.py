"""The ``einplan`` command line: argument parsing only; the work is in :mod:`einplan.api`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from einplan import __version__
from einplan.errors import EinplanError

BUNDLED_TEXT = Path(__file__).parent / "data" / "shakespeare_sample.txt"


def cmd_compile(args: argparse.Namespace) -> None:
    from einplan.api import compile_model
    from einplan.compiler.pipeline import PassContext
    from einplan.report.summary import print_compile_summary

    ctx = PassContext(use_path_cache=not args.no_path_cache)
    plan = compile_model(args.config, weight_dtype=args.weight_dtype, ctx=ctx)
    out = Path(args.output or Path(args.config).with_suffix(".plan").name)
    plan.save(out)
    print_compile_summary(plan, args.batch, args.seq)
    print(f"wrote {out} ({out.stat().st_size / 1024:,.0f} KiB)")


def cmd_eval(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from einplan.api import Session, load_plan
    from einplan.runtime.evaluate import evaluate_text
    from einplan.runtime.tokenizer import load_tokenizer
    from einplan.runtime.weights import resolve_weights_dir

    plan = load_plan(args.plan)
    weights_dir = None
    if args.weights is not None:
        weights_dir = resolve_weights_dir(args.weights)
        if weights_dir.is_file():
            weights_dir = weights_dir.parent
    tokenizer = load_tokenizer(args.tokenizer, weights_dir)
    text_path = Path(args.text_file)
    if not text_path.is_file():
        raise EinplanError(f"text file {str(text_path)!r} not found")
    text = text_path.read_text(encoding="utf-8", errors="replace")
    ids = np.asarray(tokenizer.encode(text[: args.max_tokens * 16]).ids, dtype=np.int64)
    ids = ids[: args.max_tokens + 1]
    session = Session(plan, args.weights, random_seed=args.random_weights, workers=args.workers)
    limit = plan.entry("forward").dims["seq"]
    window = min(args.window, limit)
    t0 = time.perf_counter()
    with tqdm(total=(len(ids) - 1) // window * window, unit="tok", desc="eval") as bar:
        result = evaluate_text(session.forward, ids, window, args.batch_size, bar.update)
    seconds = time.perf_counter() - t0
    print(
        f"tokens {result.tokens}  loss {result.loss:.4f}  perplexity {result.perplexity:.3f}  "
        f"({result.tokens / seconds:,.0f} tok/s, window {window}, batch {args.batch_size})"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="einplan", description=__doc__)
    p.add_argument("--version", action="version", version=f"einplan {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model config into a plan file")
    c.add_argument(
        "config",
        help="config JSON (einplan or Hugging Face config.json), a model "
        "folder, or a built-in name (tiny, smollm2-135m)",
    )
    c.add_argument("-o", "--output", help="plan file to write (default: CONFIG-NAME.plan)")
    c.add_argument(
        "--weight-dtype",
        default="f32",
        choices=["f32", "bf16", "f16"],
        help="storage dtype of the weights (compute is float32)",
    )
    c.add_argument("--batch", type=int, default=1, help="batch for the memory estimate")
    c.add_argument("--seq", type=int, default=256, help="sequence length for the estimates")
    c.add_argument(
        "--no-path-cache",
        action="store_true",
        help="plan every contraction afresh (ignore the on-disk path cache)",
    )
    c.set_defaults(func=cmd_compile)

    e = sub.add_parser("eval", help="loss and perplexity of a plan on a text file")
    e.add_argument("plan", help="plan file from einplan compile")
    w = e.add_mutually_exclusive_group(required=True)
    w.add_argument("--weights", help="HF-layout folder, .safetensors file, or hub id")
    w.add_argument(
        "--random-weights",
        type=int,
        metavar="SEED",
        help="seeded random weights instead (demos and benchmarks)",
    )
    e.add_argument(
        "--tokenizer",
        help="tokenizer.json (or folder), or 'bytes' for byte ids "
        "(default: the weights folder's tokenizer.json)",
    )
    e.add_argument(
        "--text-file",
        default=str(BUNDLED_TEXT),
        help="UTF-8 text to evaluate on (default: the bundled Shakespeare sample)",
    )
    e.add_argument("--max-tokens", type=int, default=4096, help="tokens to evaluate")
    e.add_argument("--window", type=int, default=512, help="tokens per forward window")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    e.add_argument(
        "--workers",
        type=int,
        default=0,
        help="thread-pool workers for independent steps (0: sequential)",
    )
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``einplan`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EinplanError as e:
        print(f"einplan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("einplan: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
