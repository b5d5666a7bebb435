"""``einplan quantize``: a float checkpoint into a folder of quantised weights.

The folder holds what a plan compiled with the same ``--quant`` binds without quantising at
load time: per projection the packed integers (under the weight's own name), its
``weight_scale`` (and ``weight_zero_point``), the other params as they were, and, with
calibration text, each projection's ``input_absmax`` for static activation scales; plus the
source's config and tokenizer files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from einplan.apps.calibration import Probe, calibrate_input_ranges, token_batches
from einplan.apps.compile import compile_model
from einplan.compiler.pipeline import PassContext
from einplan.compiler.quant_scheme import QuantConfig
from einplan.errors import EinplanError
from einplan.formats.files import check_not_input
from einplan.formats.weights import (
    copy_model_files,
    load_weights,
    resolve_weights_dir,
    save_safetensors,
)
from einplan.models.config import load_config


def quantize_checkpoint(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    quant: QuantConfig,
    calibration_ids: np.ndarray | None = None,
    seq: int = 256,
    batches: int = 8,
) -> dict[str, int]:
    """Write the quantised weights of ``source`` (an HF folder or hub id) to ``out_dir``;
    with ``calibration_ids`` (a token stream) also the activation ranges over its first
    ``batches`` windows of ``seq`` tokens (at most the model's limit). Returns the bytes of
    the weights as float32, the bytes written, and the calibration windows used."""
    folder = resolve_weights_dir(source)
    if not folder.is_dir():
        folder = folder.parent
    check_not_input(out_dir, [folder])
    cfg = load_config(folder)
    # unpacked: the folder holds each projection's own tensors, as the checkpoint names them
    ctx = PassContext(pack=False)
    graph = compile_model(folder, quant=quant.to_dict(), entries=("forward",), ctx=ctx).entry()
    arrays = load_weights(graph, folder, tied=cfg.tie_word_embeddings)
    float_bytes = 0  # what the same params take in float32
    for n in graph.params():
        part = n.attrs.get("quant")
        if part is None:
            float_bytes += arrays[n.attrs["key"]].nbytes
        elif part.part == "q":
            float_bytes += int(np.prod(part.shape)) * 4
    windows = []
    if calibration_ids is not None:
        windows = token_batches(calibration_ids, min(seq, cfg.max_position_embeddings), batches)
        if not windows:
            raise EinplanError(f"calibration text has fewer than {seq} tokens")
        arrays.update(calibrate_input_ranges(Probe(cfg, str(folder)), windows))
    out = Path(out_dir)
    copy_model_files(folder, out)
    save_safetensors(
        arrays, out / "model.safetensors", {"einplan_quant": json.dumps(quant.to_dict())}
    )
    return {
        "float_bytes": float_bytes,
        "quantized_bytes": sum(a.nbytes for a in arrays.values()),
        "calibration_windows": len(windows),
    }
