"""``einplan quant-report``: bytes saved and output error per projection, perplexity per
scheme, for a quantised plan on calibration and held-out text."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TextIO

from einplan.commands.arguments import positive_int
from einplan.errors import EinplanError
from einplan.formats.files import check_not_input, write_atomic


def print_report(report: dict, scheme: str, out: TextIO) -> None:
    """The per-projection table, its summary by role, and the whole-model lines."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120, file=out)
    rows = report["projections"]
    t = Table(title=f"{scheme}: per projection ({report['calibration_tokens']} calibration tokens)")
    for col in ("projection", "params", "float32 KiB", "quantised KiB", "saving", "rel. RMS error"):
        t.add_column(col, justify="left" if col == "projection" else "right")
    for r in rows:
        t.add_row(
            r.name,
            f"{r.params:,}",
            f"{r.float_bytes / 1024:,.0f}",
            f"{r.quant_bytes / 1024:,.0f}",
            f"{r.saving:.1%}",
            f"{r.rel_rms:.4f}",
        )
    console.print(t)
    console.print(role_table(rows, scheme))
    m = Table(title="whole model, held-out text")
    for col in ("scheme", "weights MiB", "loss", "perplexity", "tokens"):
        m.add_column(col, justify="left" if col == "scheme" else "right")
    for line in report["models"]:
        m.add_row(
            line.scheme,
            f"{line.weight_bytes / 2**20:,.1f}",
            f"{line.loss:.4f}",
            f"{line.perplexity:.3f}",
            str(line.tokens),
        )
    console.print(m)


def role_table(rows: list, scheme: str):
    """Per role (attn_q, ..., output): layers, parameters, bytes, mean and max error."""
    from rich.table import Table

    roles: dict[str, list] = {}
    for r in rows:
        roles.setdefault(r.name.rsplit("-", 1)[0], []).append(r)
    t = Table(title=f"{scheme}: by role")
    for col in (
        "role",
        "layers",
        "params",
        "float32 MiB",
        "quantised MiB",
        "saving",
        "error mean",
        "max",
    ):
        t.add_column(col, justify="left" if col == "role" else "right")
    for role, rs in roles.items():
        fb, qb = sum(r.float_bytes for r in rs), sum(r.quant_bytes for r in rs)
        errs = [r.rel_rms for r in rs]
        t.add_row(
            role,
            str(len(rs)),
            f"{sum(r.params for r in rs):,}",
            f"{fb / 2**20:,.1f}",
            f"{qb / 2**20:,.1f}",
            f"{1 - qb / fb:.1%}",
            f"{sum(errs) / len(errs):.4f}",
            f"{max(errs):.4f}",
        )
    return t


def run(args: argparse.Namespace) -> None:
    """Compute and print the report (and write it as JSON when asked)."""
    from einplan.api import check_weights_config, load_plan, parse_quant, plan_config, quant_report
    from einplan.commands.quantize import read_token_ids
    from einplan.formats.weights import resolve_weights_dir

    if args.json:
        check_not_input(args.json, [args.plan, args.data, args.tokenizer])
    plan = load_plan(args.plan)
    quant = parse_quant(plan.meta.get("quant"))
    if quant is None:
        raise EinplanError(f"{args.plan} is not quantised; compile it with --quant SCHEME")
    folder = resolve_weights_dir(args.weights)
    ids = read_token_ids(args.data, args.tokenizer, folder)
    compare = args.compare.split(",") if args.compare else ["fp32", quant.scheme]
    check_weights_config(plan_config(plan), folder)
    report = quant_report(
        folder,
        plan_config(plan),
        quant,
        ids,
        args.calib_batches,
        args.window,
        args.eval_tokens,
        compare,
    )
    print_report(report, quant.scheme, args.stdout)
    if args.json:
        doc = {
            "scheme": quant.to_dict(),
            "calibration_tokens": report["calibration_tokens"],
            "projections": [asdict(r) | {"saving": r.saving} for r in report["projections"]],
            "models": [asdict(m) for m in report["models"]],
        }
        write_atomic(args.json, json.dumps(doc, indent=1))
        print(f"wrote {args.json}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``quant-report`` parser."""
    q = sub.add_parser("quant-report", help="per-projection error and bytes, perplexity per scheme")
    q.add_argument("plan", help="a plan compiled with --quant")
    q.add_argument("--weights", required=True, help="the float weights (HF folder or hub id)")
    q.add_argument("--data", required=True, help="text: calibration windows, then held-out text")
    q.add_argument("--tokenizer", help="tokenizer.json or 'bytes' (default: the weights')")
    q.add_argument("--calib-batches", type=positive_int, default=4, help="calibration windows")
    q.add_argument("--window", type=positive_int, default=256, help="tokens per window")
    q.add_argument(
        "--eval-tokens", type=positive_int, default=4096, help="held-out tokens for perplexity"
    )
    q.add_argument(
        "--compare",
        help="schemes for the whole-model lines, e.g. fp32,w8a16,w4a16,w8a8,w4a4 "
        "(default: fp32 and the plan's)",
    )
    q.add_argument("--json", help="also write the report as JSON")
    q.set_defaults(func=run)
