"""``einplan quantize``: write a folder of quantised weights (and calibrated activation
ranges) that plans compiled with the same ``--quant`` load as they are."""

from __future__ import annotations

import argparse
from pathlib import Path

from einplan.commands.arguments import positive_int
from einplan.errors import EinplanError


def read_token_ids(text_file: str, tokenizer_spec: str | None, weights: Path | None):
    """Token ids (int64) of a UTF-8 text file, by the weights' tokenizer or ``tokenizer_spec``."""
    import numpy as np

    from einplan.formats.tokenizer import load_tokenizer

    path = Path(text_file)
    if not path.is_file():
        raise EinplanError(f"text file {str(path)!r} not found")
    tokenizer = load_tokenizer(tokenizer_spec, weights)
    text = path.read_text(encoding="utf-8", errors="replace")
    return np.asarray(tokenizer.encode(text).ids, dtype=np.int64)


def quant_options(args: argparse.Namespace) -> dict | None:
    """The ``--quant`` scheme and its options as a config section (None: no quantisation)."""
    if args.quant is None:
        extra = [
            o
            for o, v in (
                ("--group-size", args.group_size),
                ("--asymmetric", args.asymmetric),
                ("--act-scales", args.act_scales),
            )
            if v
        ]
        if extra:
            raise EinplanError(f"{', '.join(extra)} only apply with --quant SCHEME")
        return None
    return {
        "scheme": args.quant,
        "group_size": args.group_size or 64,
        "symmetric": not args.asymmetric,
        "activations": args.act_scales or "dynamic",
    }


def add_quant_arguments(
    p: argparse.ArgumentParser, scheme_flag: str = "--quant", required: bool = False
) -> None:
    """``--quant SCHEME`` (or the given flag) with --group-size, --asymmetric, --act-scales."""
    p.add_argument(
        scheme_flag,
        dest="quant",
        required=required,
        metavar="SCHEME",
        help="quantisation scheme: w8a16, w4a16, w8a8, w4a4 or w8a4",
    )
    p.add_argument(
        "--group-size", type=positive_int, help="int4 group length: 32, 64 (default) or 128"
    )
    p.add_argument("--asymmetric", action="store_true", help="weights with zero points")
    p.add_argument(
        "--act-scales",
        choices=["dynamic", "static"],
        help="activation scales per token (dynamic, default) or calibrated (static)",
    )


def run(args: argparse.Namespace) -> None:
    """Quantise the checkpoint, optionally calibrating activation ranges on text."""
    from einplan.api import parse_quant, quantize_checkpoint
    from einplan.formats.weights import resolve_weights_dir

    quant = parse_quant(quant_options(args))
    ids = None
    if args.calibrate:
        ids = read_token_ids(args.calibrate, args.tokenizer, resolve_weights_dir(args.weights))
    sizes = quantize_checkpoint(
        args.weights, args.output, quant, ids, args.calib_seq, args.calib_batches
    )
    ratio = sizes["quantized_bytes"] / sizes["float_bytes"]
    print(
        f"wrote {args.output}/ ({quant.scheme}, weights {sizes['float_bytes'] / 2**20:,.1f} MiB "
        f"float32 -> {sizes['quantized_bytes'] / 2**20:,.1f} MiB, {ratio:.1%}"
        + (f"; activation ranges from {n} windows" if (n := sizes["calibration_windows"]) else "")
        + ")"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``quantize`` parser."""
    q = sub.add_parser("quantize", help="write quantised weights for plans compiled with --quant")
    q.add_argument("weights", help="HF-layout folder (float weights) or hub id")
    add_quant_arguments(q, "--scheme", required=True)
    q.add_argument("--calibrate", metavar="TEXT", help="text whose activation ranges to store")
    q.add_argument("--calib-batches", type=positive_int, default=8, help="calibration windows")
    q.add_argument(
        "--calib-seq", type=positive_int, default=256, help="tokens per calibration window"
    )
    q.add_argument("--tokenizer", help="tokenizer.json or 'bytes' (default: the weights')")
    q.add_argument("-o", "--output", required=True, help="folder to write")
    q.set_defaults(func=run)
