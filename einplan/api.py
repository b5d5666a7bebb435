"""The Python API the CLI is a thin layer over: compile, save/load, bind weights, forward."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from einplan.compiler.ir import Graph
from einplan.compiler.lora_spec import parse_lora
from einplan.compiler.pipeline import PASSES, TRAIN_PASSES, PassContext, run_pipeline
from einplan.compiler.plan import Plan
from einplan.compiler.quant_scheme import parse_quant
from einplan.errors import EinplanError
from einplan.models.config import (
    ModelConfig,
    config_differences,
    config_sections,
    load_config,
    parse_config,
)
from einplan.models.llama import ENTRIES, build_graph
from einplan.models.train_config import COMPUTE_DTYPES, TrainConfig, load_train_config
from einplan.runtime.executor import Executor, InputError
from einplan.runtime.lora import init_lora, load_adapter
from einplan.runtime.recorder import Recorder
from einplan.runtime.weights import WeightsError, load_weights, random_weights, weights_config

WEIGHT_DTYPES = ("f32", "bf16", "f16", "f64")
# entries made from the traced loss graph, and the passes that make them
DERIVED = {
    "loss": PASSES,
    "grad": (
        *PASSES[:2],
        "autodiff",
        *PASSES[2:],
    ),  # loss and the gradient of every parameter, as outputs
    "train_step": TRAIN_PASSES,  # loss, backward, gradient accumulation and optimizer update
}
# A training plan: the step, validation loss, and generation for samples (and Session).
TRAIN_ENTRIES = ("train_step", "loss", "forward", "prefill", "decode")


def compile_model(
    config: str | Path | dict[str, Any],
    *,
    weight_dtype: str | None = None,
    compute_dtype: str | None = None,
    entries: tuple[str, ...] = ENTRIES,
    train: TrainConfig | None = None,
    ctx: PassContext | None = None,
    lora: str | dict[str, Any] | None = None,
    quant: str | dict[str, Any] | None = None,
) -> Plan:
    """Trace a model config (path, built-in name, dict or HF config.json) and compile each
    entry point (``forward``, ``prefill``, ``decode``; ``loss``, ``grad``, ``train_step`` for
    training, whose optimizer settings come from ``train`` or the config's train section)
    into one plan. Weights are stored in ``weight_dtype`` and computed in ``compute_dtype``
    (default: the train section's, else float32); both default to each other. ``lora``
    (``"r=8,alpha=16,targets=q,v"`` or a dict) and ``quant`` (``"w4a16"`` or a dict with
    group_size, symmetric, activations) override the config's sections of those names."""
    t0 = time.perf_counter()
    cfg = load_config(config)
    train = train or load_train_config(config)
    compute_dtype = compute_dtype or train.compute_dtype
    weight_dtype = weight_dtype or compute_dtype
    if weight_dtype not in WEIGHT_DTYPES:
        raise EinplanError(
            f"weight dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}"
        )
    if compute_dtype not in COMPUTE_DTYPES:
        raise EinplanError(f"compute dtype {compute_dtype!r} is not one of {COMPUTE_DTYPES}")
    if weight_dtype != compute_dtype and {"grad", "train_step"} & set(entries):
        raise EinplanError(
            f"training needs the weights stored in the compute dtype ({compute_dtype}), "
            f"not {weight_dtype}"
        )
    sections = config_sections(config)
    ctx = ctx or PassContext()
    ctx.train = train
    ctx.lora = parse_lora(lora if lora is not None else sections.get("lora"))
    ctx.quant = parse_quant(quant if quant is not None else sections.get("quant"))
    if {"grad", "train_step"} & set(entries):
        # every entry of a training plan reads the one set of weights the optimizer updates
        # in place: none may pack them into copies
        ctx.skip = (*ctx.skip, "pack")
    graphs = {}
    for entry in entries:
        traced = "loss" if entry in DERIVED else entry
        graph = build_graph(cfg, traced, weight_dtype, compute_dtype)
        graph.name = entry
        graphs[entry] = run_pipeline(graph, ctx, DERIVED.get(entry, PASSES))
    params = parameter_count(graphs[entries[0]])
    meta = {
        "weight_dtype": weight_dtype,
        "compute_dtype": compute_dtype,
        "lora": ctx.lora.to_dict() if ctx.lora else None,
        "quant": ctx.quant.to_dict() if ctx.quant else None,
        "parameters": params,
        "passes": ctx.stats,
        "compile_seconds": time.perf_counter() - t0,
    }
    if "train_step" in entries:
        meta["train"] = train.to_dict()
    return Plan(cfg.to_dict(), graphs, meta)


def parameter_count(graph: Graph) -> int:
    """Parameters of the model a graph computes (LoRA's included): a quantised weight counts
    as the float matrix it stands for, its scales and zero points not at all."""
    total = 0
    for n in graph.params():
        quant = n.attrs.get("quant")
        if quant is None:
            total += int(np.prod(n.shape))
        elif quant["part"] == "q":
            total += int(np.prod(quant["shape"]))
    return total


def load_plan(path: str | Path) -> Plan:
    """Read a plan file (clear errors for foreign, damaged or other-version files)."""
    return Plan.load(path)


def plan_config(plan: Plan) -> ModelConfig:
    """The normalised model config a plan was compiled from."""
    raw = dict(plan.config)
    return ModelConfig(**raw) if raw else parse_config(raw)


def check_weights_config(config: ModelConfig, weights: str | os.PathLike) -> None:
    """Refuse weights whose own config (config.json, GGUF metadata) describes another model."""
    raw = weights_config(weights)
    if raw is None:
        return
    diff = config_differences(config, parse_config(raw, f"config of {weights}"))
    if diff:
        raise WeightsError(
            f"weights {weights} are for a different model than this plan ({'; '.join(diff)}); "
            "compile the plan from the weights' config.json"
        )


class Session:
    """A plan bound to weights, ready to run ``forward`` on token ids."""

    def __init__(
        self,
        plan: Plan | str | Path,
        weights: str | os.PathLike | dict | None = None,
        *,
        random_seed: int | None = None,
        workers: int = 0,
        adapter: str | os.PathLike | None = None,
        lora_seed: int = 0,
    ) -> None:
        """Bind ``weights`` (HF folder, safetensors file, hub id, GGUF file, or a dict of
        arrays under Hugging Face names), or
        seeded random weights when ``random_seed`` is given instead. One of the two is needed:
        there is no silent random fallback. A plan with LoRA takes its A and B from
        ``adapter`` (a PEFT folder made for these weights) or, without one, fresh ones
        (``lora_seed``; B is zero, so the logits are the base model's)."""
        self.plan = plan if isinstance(plan, Plan) else load_plan(plan)
        self.config = plan_config(self.plan)
        graph = self.plan.entry("forward")
        if (weights is None) == (random_seed is None):
            raise ValueError(
                "give either weights or random_seed (random weights), not both or neither"
            )
        if random_seed is not None:
            arrays = random_weights(graph, random_seed)
        else:
            if not isinstance(weights, dict):
                check_weights_config(self.config, weights)
            arrays = load_weights(graph, weights, tied=self.config.tie_word_embeddings)
        if adapter is not None:
            arrays.update(load_adapter(adapter, graph, arrays))
        else:
            arrays.update(init_lora(graph, lora_seed))
        self.weights = arrays
        self.executor = Executor(graph, arrays, workers)

    def forward(
        self,
        tokens: np.ndarray,
        positions: np.ndarray | None = None,
        recorder: Recorder | None = None,
    ) -> np.ndarray:
        """Logits, float32 ``(batch, seq, vocab)``, for integer token ids ``(batch, seq)``."""
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None, :]
        if tokens.ndim != 2:
            raise InputError(
                f"token ids must have rank 2 (batch, seq), got shape {list(tokens.shape)}"
            )
        if not np.issubdtype(tokens.dtype, np.integer):
            raise InputError(f"token ids must be integers, got {tokens.dtype}")
        vocab = self.config.vocab_size
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            raise InputError(
                f"token ids must lie in 0..{vocab - 1}, got {tokens.min()}..{tokens.max()}"
            )
        if positions is None:
            positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
        out = self.executor.run({"tokens": tokens, "positions": positions}, recorder)
        return out["logits"]
