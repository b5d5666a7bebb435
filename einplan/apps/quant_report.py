"""What quantisation costs, projection by projection and for the whole model.

Per projection: its parameters, bytes in float32 and quantised, and the relative RMS error of
its output, ``||x^ W^T - x W^T|| / ||x W^T||`` over calibration text, where x is the input the
float32 model gives it and x^, W^ are that input and weight after quantisation (the error
each projection adds on its own). Whole model: perplexity on held-out text per scheme.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from einplan.apps.calibration import Probe, calibrate_input_ranges
from einplan.apps.compile import compile_model
from einplan.apps.evaluate import evaluate_text
from einplan.apps.session import Session
from einplan.compiler.quant_scheme import (
    SCHEMES,
    QuantConfig,
    QuantError,
    input_absmax_key,
    parse_quant,
    stored_layout,
    weight_group,
)
from einplan.errors import EinplanError
from einplan.formats.weights import open_checkpoint
from einplan.models.config import ModelConfig
from einplan.runtime.qmatmul import QuantizedMatrix
from einplan.runtime.quantize import fake_quantize, quantize_weight


@dataclass
class ProjectionError:
    """One projection's size and output error under a scheme."""

    name: str
    params: int
    float_bytes: int
    quant_bytes: int
    rel_rms: float

    @property
    def saving(self) -> float:
        """Share of the float32 bytes saved."""
        return 1 - self.quant_bytes / self.float_bytes


@dataclass
class ModelLine:
    """One scheme's weight bytes and perplexity on held-out text."""

    scheme: str
    weight_bytes: int
    loss: float
    perplexity: float
    tokens: int


def projection_errors(
    probe: Probe,
    tensors: dict[str, np.ndarray],
    quant: QuantConfig,
    batches: list[np.ndarray],
    ranges: dict[str, np.ndarray],
) -> list[ProjectionError]:
    """Each projection's bytes and relative output error under ``quant`` on ``batches``."""
    err: dict[str, list[float]] = {}
    weights: dict[str, np.ndarray] = {}  # quantised then dequantised, per weight
    for tokens in tqdm(batches, desc="projection errors", unit="window", delay=2):
        for p, x, y in probe.run(tokens):
            if p.weight_key not in weights:
                w = tensors[p.weight_key]
                group = weight_group(quant, w.shape[1], p.name)
                parts = quantize_weight(w, quant.weight_bits, group, quant.symmetric)
                zero = parts.get("zero_point")
                weights[p.weight_key] = QuantizedMatrix(
                    parts["q"], parts["scale"], zero, quant.weight_bits, group
                ).dequantize()
            if quant.act_bits < 16:
                static = quant.activations == "static"
                absmax = ranges[input_absmax_key(p.weight_key)] if static else None
                x = fake_quantize(x, quant.act_bits, absmax)
            diff = x @ weights[p.weight_key].T - y
            e = err.setdefault(p.name, [0.0, 0.0])
            e[0] += float((diff.astype(np.float64) ** 2).sum())
            e[1] += float((y.astype(np.float64) ** 2).sum())
    out = []
    for p in probe.projections:
        n_out, n_in = tensors[p.weight_key].shape
        group = weight_group(quant, n_in, p.name)
        layout = stored_layout(quant.weight_bits, group, quant.symmetric, (n_out, n_in))
        stored = sum(int(np.prod(s)) * (4 if d == "f32" else 1) for s, d in layout.values())
        sq, ref = err[p.name]
        rel = float(np.sqrt(sq / ref))
        out.append(ProjectionError(p.name, n_out * n_in, 4 * n_out * n_in, stored, rel))
    return out


def model_line(
    config: str | os.PathLike,
    weights: dict[str, np.ndarray],
    scheme: QuantConfig | None,
    ids: np.ndarray,
    window: int,
) -> ModelLine:
    """Perplexity of the model under ``scheme`` (None: float32) on the token stream ``ids``."""
    plan = compile_model(config, quant=scheme.to_dict() if scheme else None, entries=("forward",))
    session = Session(plan, weights)
    result = evaluate_text(session.forward, ids, window, 1)
    nbytes = sum(a.nbytes for k, a in session.weights.items() if not k.endswith(".input_absmax"))
    name = scheme.scheme if scheme else "fp32"
    if scheme and scheme.weight_bits == 4:
        name += f" g{scheme.group_size}"
    return ModelLine(name, nbytes, result.loss, result.perplexity, result.tokens)


def scheme_like(name: str, base: QuantConfig) -> QuantConfig | None:
    """Scheme ``name`` ("fp32": None) with the group size, symmetry and (where it quantises
    activations) activation mode of ``base``."""
    if name == "fp32":
        return None
    if name not in SCHEMES:
        raise QuantError(f"unknown scheme {name!r} to compare (known: fp32, {', '.join(SCHEMES)})")
    return parse_quant(
        {
            "scheme": name,
            "group_size": base.group_size,
            "symmetric": base.symmetric,
            "activations": base.activations if SCHEMES[name][1] < 16 else "dynamic",
        }
    )


def quant_report(
    weights: str | os.PathLike,
    cfg: ModelConfig,
    quant: QuantConfig,
    ids: np.ndarray,
    calib_batches: int,
    window: int,
    eval_tokens: int,
    compare: list[str],
) -> dict:
    """The per-projection table for ``quant`` on the first ``calib_batches`` windows of
    ``ids`` and the whole-model lines for ``compare`` (scheme names, "fp32") on the
    ``eval_tokens`` tokens after them, for the float weights in folder ``weights``."""
    window = min(window, cfg.max_position_embeddings)
    batches = [ids[i * window : (i + 1) * window][None] for i in range(calib_batches)]
    held_out = ids[calib_batches * window :][: eval_tokens + 1]
    if len(batches[-1][0]) < window or len(held_out) <= window:
        raise EinplanError(
            f"text too short: need {calib_batches} calibration windows and {window + 1} "
            f"held-out tokens of {window}-token windows, have {len(ids)} tokens"
        )
    tensors = {k: np.asarray(a) for k, (a, _) in open_checkpoint(weights).items()}
    probe = Probe(cfg, tensors)
    ranges = calibrate_input_ranges(probe, batches)
    rows = projection_errors(probe, tensors, quant, batches, ranges)
    lines = [
        model_line(weights, {**tensors, **ranges}, scheme_like(name, quant), held_out, window)
        for name in tqdm(compare, desc="evaluate schemes", unit="scheme", delay=2)
    ]
    return {"projections": rows, "models": lines, "calibration_tokens": calib_batches * window}
