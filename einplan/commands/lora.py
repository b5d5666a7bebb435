"""``einplan lora merge``: fold a LoRA adapter into its base weights (a new HF folder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from einplan.errors import EinplanError
from einplan.formats.files import check_not_input, write_atomic


def run_merge(args: argparse.Namespace) -> None:
    """Write base weights with ``W + (alpha / r) B A`` for every adapted projection."""
    from einplan.api import compile_model
    from einplan.formats.checkpoint import verified_source, verified_weights
    from einplan.formats.peft import adapter_options, load_adapter, merge_lora
    from einplan.formats.weights import (
        copy_model_files,
        open_checkpoint,
        resolve_weights_dir,
        save_safetensors,
    )

    folder = verified_weights(resolve_weights_dir(args.weights))
    adapter_dir = verified_source(Path(args.adapter))
    check_not_input(args.output, [folder, adapter_dir])
    options = adapter_options(adapter_dir)
    graph = compile_model(folder, lora=options, entries=("forward",)).entry()
    tensors = {k: a for k, (a, _) in open_checkpoint(folder).items()}
    if any(a.dtype.kind in "iu" for k, a in tensors.items() if k.endswith("weight")):
        raise EinplanError(f"{folder}: quantised weights; merge into the float checkpoint")
    adapter = load_adapter(adapter_dir, graph, tensors)
    merged = merge_lora(tensors, adapter, float(options["alpha"]) / options["r"])
    out = Path(args.output)
    copy_model_files(folder, out)
    if "lm_head.weight" in merged and "lm_head.weight" not in tensors:
        config = json.loads((out / "config.json").read_text())
        config["tie_word_embeddings"] = False  # the merged head differs from the embedding
        write_atomic(out / "config.json", json.dumps(config, indent=2))
    save_safetensors(merged, out / "model.safetensors")
    print(f"wrote {out}/ ({len(adapter) // 2} projections merged)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``lora`` parser with its ``merge`` subcommand."""
    lora = sub.add_parser("lora", help="LoRA adapters: merge into base weights")
    actions = lora.add_subparsers(dest="lora_command", required=True)
    m = actions.add_parser("merge", help="fold an adapter into its base weights")
    m.add_argument("adapter", help="PEFT adapter folder (adapter_config.json + safetensors)")
    m.add_argument("--weights", required=True, help="the base model's HF folder or hub id")
    m.add_argument("-o", "--output", required=True, help="folder to write the merged model")
    m.set_defaults(func=run_merge)
