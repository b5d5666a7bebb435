"""``einplan compile``: a config into a plan file, with a summary of what it holds and costs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from einplan.commands.arguments import (
    add_attention_argument,
    add_checkpoint_argument,
    positive_int,
)
from einplan.commands.quantize import add_quant_arguments
from einplan.formats.files import write_atomic

if TYPE_CHECKING:
    from einplan.api import Graph


class PassNames:
    """The passes ``--dump-after`` takes (every pass, in pipeline order),
    read from the API only when asked for: building the parser loads no compiler."""

    def __iter__(self) -> Iterator[str]:
        from einplan.api import ALL_PASSES

        return iter(ALL_PASSES)

    def __contains__(self, name: object) -> bool:
        return name in tuple(self)


def run(args: argparse.Namespace) -> None:
    """Compile, save, and print the summary."""
    from einplan.api import ENTRIES, TRAIN_ENTRIES, PassContext, compile_model, memory_warning
    from einplan.commands.quantize import quant_options
    from einplan.formats.files import check_not_input
    from einplan.formats.peft import adapter_options
    from einplan.report.summary import print_compile_summary

    out = Path(args.output or Path(args.config).with_suffix(".plan").name)
    check_not_input(out, [args.config, args.lora])
    ctx = PassContext(
        use_path_cache=not args.no_path_cache,
        dump_after=tuple(args.dump_after),
        on_dump=lambda name, graph: dump_graph(name, graph, args.dump_dir),
    )
    plan = compile_model(
        args.config,
        weight_dtype=args.weight_dtype,
        compute_dtype=args.compute_dtype,
        entries=(TRAIN_ENTRIES if args.train else ENTRIES)
        + (("verify",) if args.speculative else ()),
        ctx=ctx,
        lora=adapter_options(args.lora) if args.lora and Path(args.lora).is_dir() else args.lora,
        quant=quant_options(args),
        attention=args.attention,
        checkpoint=args.checkpoint,
    )
    plan.save(out)
    print_compile_summary(plan, args.batch, args.seq)
    warning = memory_warning(plan, args.batch, args.seq)
    if warning:
        print(f"einplan: warning: {warning}", file=sys.stderr)
    print(f"wrote {out} ({out.stat().st_size / 1024:,.0f} KiB)")


def dump_graph(pass_name: str, graph: Graph, out_dir: str | None) -> None:
    """Print the graph as it leaves a pass, or write it to ``out_dir/ENTRY.after-PASS.txt``."""
    text = f"# after pass {pass_name}\n{graph}\n"
    if out_dir is None:
        print(text)
        return
    path = write_atomic(Path(out_dir) / f"{graph.name}.after-{pass_name}.txt", text)
    print(f"wrote {path}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``compile`` parser."""
    c = sub.add_parser("compile", help="compile a model config into a plan file")
    c.add_argument(
        "config",
        help="config JSON (einplan or Hugging Face config.json), a model "
        "folder, or a built-in name (tiny, smollm2-135m)",
    )
    c.add_argument("-o", "--output", help="plan file to write (default: CONFIG-NAME.plan)")
    c.add_argument(
        "--weight-dtype",
        choices=["f32", "bf16", "f16", "f64"],
        help="storage dtype of the weights (default: the compute dtype)",
    )
    c.add_argument(
        "--compute-dtype",
        choices=["f32", "f64", "bf16", "f16"],
        help="dtype of every computed value (default: the train section's, else f32); bf16 "
        "and f16 are mixed precision: 16-bit values, float32 weights, optimizer state and loss",
    )
    c.add_argument(
        "--train",
        action="store_true",
        help="also compile train_step (forward, backward, optimizer) and loss entries, with "
        "the config's train settings",
    )
    c.add_argument(
        "--speculative",
        action="store_true",
        help="also compile the verify entry, so the plan can be the target of speculative "
        "decoding (einplan run --draft)",
    )
    c.add_argument("--batch", type=positive_int, default=1, help="batch for the memory estimate")
    c.add_argument(
        "--seq", type=positive_int, default=256, help="sequence length for the estimates"
    )
    c.add_argument(
        "--no-path-cache",
        action="store_true",
        help="plan every contraction afresh (ignore the on-disk path cache)",
    )
    c.add_argument(
        "--dump-after",
        action="append",
        default=[],
        metavar="PASS",
        choices=PassNames(),
        help="print the graph after this pass (repeatable; passes: %(choices)s)",
    )
    c.add_argument("--dump-dir", metavar="DIR", help="write --dump-after graphs here instead")
    c.add_argument(
        "--lora",
        metavar="SPEC",
        help="LoRA adapters, e.g. r=8,alpha=16,targets=q,k,v,o,dropout=0.05 "
        "(targets: q k v o gate up down lm_head), or a PEFT adapter folder to match",
    )
    add_attention_argument(c)
    add_checkpoint_argument(c)
    add_quant_arguments(c)
    c.set_defaults(func=run)
