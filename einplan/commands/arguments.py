"""Argument types shared by the commands: sizes, counts and sampling settings are checked as
they are parsed, so that ``--steps 0`` or ``--top-p 1.5`` is a usage error, not a default."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def parse_int(text: str, least: int, what: str) -> int:
    """``text`` as an integer of at least ``least``, or a usage error naming ``what``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def parse_float(text: str, ok: Callable[[float], bool], what: str) -> float:
    """``text`` as a finite number for which ``ok(value)`` holds, or a usage error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """A count or size of at least 1 (steps, tokens, window, batch)."""
    return parse_int(text, 1, "a whole number of at least 1")


def non_negative_int(text: str) -> int:
    """A whole number of at least 0 (seeds, workers, 0 meaning off)."""
    return parse_int(text, 0, "a whole number of at least 0")


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (temperature)."""
    return parse_float(text, lambda v: v >= 0, "a finite number of at least 0")


def positive_float(text: str) -> float:
    """A finite number above 0 (repetition penalty)."""
    return parse_float(text, lambda v: v > 0, "a finite number above 0")


def probability(text: str) -> float:
    """A probability mass in (0, 1] (top-p)."""
    return parse_float(text, lambda v: 0 < v <= 1, "a number in (0, 1]")


# compiler/passes/flash.py ATTENTION_CHOICES (tests/test_flash_attention.py checks they agree):
# the parser is built without loading the compiler
ATTENTION_CHOICES = ("auto", "flash", "plain")


def add_attention_argument(parser: argparse.ArgumentParser, when: str = "") -> None:
    """Add ``--attention auto|flash|plain`` (compile_model's ``attention``)."""
    parser.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        help=f"attention kernel {when}(default auto: flash attention, tiled above a measured "
        "length, except decode; plain: the scores -> softmax -> context chain)",
    )


def checkpoint_policy(text: str) -> str:
    """An activation checkpointing policy (none, layers, every:K, selective), checked by the
    compiler's parser (loaded only when the option is given)."""
    from einplan.api import CheckpointError, parse_checkpoint

    try:
        parse_checkpoint(text)
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--checkpoint POLICY``, the activation checkpointing of the training entries."""
    parser.add_argument(
        "--checkpoint",
        type=checkpoint_policy,
        metavar="POLICY",
        help="activation checkpointing of the training step: none (keep every activation), "
        "layers (keep each layer's input, recompute the layer in the backward pass), every:K "
        "(keep every K-th layer's input), selective (recompute norms and SwiGLU only); "
        "default: the config's train section, else none",
    )
