"""Calibration: run the float32 model on text and look at what each projection sees.

The forward graph is compiled with every linear einsum's input and output added to its
outputs, so one run yields, per projection (``attn_q-3``, ``output``), the activations that
static quantisation scales (``input_absmax``) and the quantisation report are made from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from einplan.apps.evaluate import windows
from einplan.compiler.ir import Graph
from einplan.compiler.ops import Op
from einplan.compiler.pipeline import PassContext, run_pipeline
from einplan.compiler.quant_scheme import input_absmax_key
from einplan.compiler.tags import Tag
from einplan.formats.weights import load_weights
from einplan.models.config import ModelConfig
from einplan.models.llama import build_graph
from einplan.runtime.executor import Executor


@dataclass(frozen=True)
class Projection:
    """One linear einsum: its node name and the checkpoint key of its weight."""

    name: str
    weight_key: str


def projections(graph: Graph) -> list[Projection]:
    """The linear einsums of a traced (not yet compiled) graph, in order."""
    nodes = graph.by_id()
    found = []
    for n in graph.nodes:
        if n.op is Op.EINSUM and Tag.LINEAR in n.tags:
            w = nodes[n.inputs[1]]
            w = nodes[w.inputs[0]] if w.op is Op.CAST else w
            found.append(Projection(n.name, w.attrs["key"]))
    return found


class Probe:
    """The float32 forward pass with every projection's input and output exposed."""

    def __init__(self, cfg: ModelConfig, weights: str | Mapping[str, np.ndarray]) -> None:
        """``weights``: a checkpoint path or a dict of float tensors under HF names."""
        graph = build_graph(cfg, "forward")
        self.projections = projections(graph)
        by_name = {n.name: n for n in graph.nodes if n.op is Op.EINSUM and Tag.LINEAR in n.tags}
        for p in self.projections:
            n = by_name[p.name]
            graph.outputs[f"x:{p.name}"] = n.inputs[0]
            graph.outputs[f"y:{p.name}"] = n.id
        self.graph = run_pipeline(graph, PassContext())
        source = weights if isinstance(weights, str) else dict(weights)
        self.arrays = load_weights(self.graph, source, tied=cfg.tie_word_embeddings)
        self.executor = Executor(self.graph, self.arrays)

    def run(self, tokens: np.ndarray) -> Iterator[tuple[Projection, np.ndarray, np.ndarray]]:
        """For one batch of token ids: each projection with its (tokens, in) input and
        (tokens, out) output."""
        positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
        out = self.executor.run({"tokens": tokens, "positions": positions})
        for p in self.projections:
            x, y = out[f"x:{p.name}"], out[f"y:{p.name}"]
            yield p, x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


def calibrate_input_ranges(probe: Probe, batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The largest |input| of every projection over the batches, as ``...input_absmax``
    tensors (f32[1]) for static activation scales."""
    ranges: dict[str, float] = {}
    for tokens in batches:
        for p, x, _ in probe.run(tokens):
            key = input_absmax_key(p.weight_key)
            ranges[key] = max(ranges.get(key, 0.0), float(np.abs(x).max()))
    return {k: np.array([v], np.float32) for k, v in ranges.items()}


def token_batches(ids: np.ndarray, seq: int, count: int) -> list[np.ndarray]:
    """The first ``count`` non-overlapping (1, seq) windows of a token stream."""
    return [w[:, :-1] for w, _ in zip(windows(ids, seq, 1), range(count), strict=False)]
