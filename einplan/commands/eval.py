"""``einplan eval``: next-token loss and perplexity of a plan on a text file."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from einplan.commands.arguments import non_negative_int, positive_int
from einplan.errors import EinplanError

BUNDLED_TEXT = Path(__file__).resolve().parent.parent / "data" / "shakespeare_sample.txt"


def run(args: argparse.Namespace) -> None:
    """Tokenize the text, run the plan over windows, print loss and perplexity."""
    from tqdm import tqdm

    from einplan.api import Recorder, evaluate_text, load_plan
    from einplan.formats.tokenizer import load_tokenizer
    from einplan.formats.weights import resolve_weights_dir
    from einplan.report.profile import write_profile

    check_profile(args, args.plan, args.weights, args.text_file, args.tokenizer, args.adapter)
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
    session = open_session(plan, args, tokenizer)
    window = min(args.window, plan.entry("forward").dims["seq"])
    recorder = Recorder() if args.profile else None
    t0 = time.perf_counter()
    with tqdm(total=(len(ids) - 1) // window * window, unit="tok", desc="eval") as bar:
        result = evaluate_text(
            lambda tokens: session.forward(tokens, recorder=recorder),
            ids,
            window,
            args.batch_size,
            bar.update,
        )
    seconds = time.perf_counter() - t0
    print(
        f"tokens {result.tokens}  loss {result.loss:.4f}  perplexity {result.perplexity:.3f}  "
        f"({result.tokens / seconds:,.0f} tok/s, window {window}, batch {args.batch_size})",
        file=args.stdout,  # the result, also under --quiet
    )
    if recorder is not None:
        write_profile(recorder, args.profile)


def open_session(plan, args: argparse.Namespace, tokenizer):
    """The plan bound to the weights (and LoRA adapter) the arguments name, and the
    tokenizer loaded for them."""
    from einplan.api import Session

    return Session(
        plan,
        args.weights,
        random_seed=args.random_weights,
        workers=args.workers,
        adapter=args.adapter,
        tokenizer=tokenizer,
        kernels=args.kernels,
        device=args.device,
        cuda_graph=args.cuda_graph,
        tf32=args.tf32,
    )


def add_kernels_argument(p: argparse.ArgumentParser) -> None:
    """``--kernels numpy|numba``: the backend that runs the steps (the plan is unchanged);
    ``--device cpu|cuda`` with the GPU's ``--no-cuda-graph`` and ``--tf32``."""
    p.add_argument(
        "--kernels",
        choices=["numpy", "numba"],
        help="kernels backend (default: numba when installed, else numpy); the plan and "
        "its results are the same to float32 rounding",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the plan runs: cpu (numpy) or cuda (an NVIDIA GPU through CuPy: "
        "pip install 'einplan[cuda12]' or 'einplan[cuda13]')",
    )
    p.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_false",
        help="cuda: launch the steps one by one instead of replaying each entry as a CUDA graph",
    )
    p.add_argument(
        "--tf32", action="store_true", help="cuda: float32 products on TF32 tensor cores"
    )


def add_weights_arguments(p: argparse.ArgumentParser) -> None:
    """``--weights`` or ``--random-weights SEED`` (one required), ``--adapter``, ``--tokenizer``
    and ``--kernels``: everything :func:`open_session` reads."""
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("-m", "--weights", help="HF-layout folder, .safetensors file, or hub id")
    w.add_argument(
        "--random-weights",
        type=non_negative_int,
        metavar="SEED",
        help="seeded random weights instead (demos and benchmarks)",
    )
    p.add_argument("--adapter", help="LoRA adapter folder (PEFT layout) for a plan with --lora")
    p.add_argument(
        "--tokenizer",
        help="tokenizer.json (or folder), or 'bytes' for byte ids "
        "(default: the weights folder's tokenizer.json)",
    )
    add_kernels_argument(p)


def check_profile(args: argparse.Namespace, *inputs: str | None) -> None:
    """Refuse a ``--profile DIR`` whose trace file would be written over one of ``inputs``."""
    from einplan.formats.files import check_not_input
    from einplan.report.profile import TRACE_NAME

    if args.profile:
        check_not_input(Path(args.profile) / TRACE_NAME, inputs)


def add_profile_argument(p: argparse.ArgumentParser) -> None:
    """``--profile DIR``: time every step, write DIR/trace.json and print the phase table."""
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="record every step: write DIR/trace.json (Chrome trace; einplan report DIR) and "
        "print the cost by phase",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``eval`` parser."""
    e = sub.add_parser("eval", help="loss and perplexity of a plan on a text file")
    e.add_argument("plan", help="plan file from einplan compile")
    add_weights_arguments(e)
    e.add_argument(
        "--text-file",
        default=str(BUNDLED_TEXT),
        help="UTF-8 text to evaluate on (default: the bundled Shakespeare sample)",
    )
    e.add_argument("--max-tokens", type=positive_int, default=4096, help="tokens to evaluate")
    e.add_argument("--window", type=positive_int, default=512, help="tokens per forward window")
    e.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward")
    e.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="thread-pool workers for independent steps (0: sequential)",
    )
    add_profile_argument(e)
    e.set_defaults(func=run)
