"""``einplan convert``: a llama.cpp GGUF file into a Hugging Face layout folder."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    """Dequantise and write config.json, model.safetensors and the tokenizer files."""
    from einplan.formats.files import check_not_input
    from einplan.formats.gguf_convert import convert_gguf

    check_not_input(args.output, [args.gguf])
    out = convert_gguf(args.gguf, args.output, args.dtype)
    print(
        f"wrote {out}/ (config.json, model.safetensors, tokenizer.json, "
        "tokenizer_config.json, generation_config.json)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``convert`` parser."""
    c = sub.add_parser("convert", help="convert a GGUF file into a Hugging Face folder")
    c.add_argument("gguf", help="llama.cpp GGUF model file")
    c.add_argument("-o", "--output", required=True, help="folder to write")
    c.add_argument(
        "--dtype",
        default="f32",
        choices=["f32", "bf16", "f16"],
        help="dtype of the written weights",
    )
    c.set_defaults(func=run)
