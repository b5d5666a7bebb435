"""A plan bound to weights: the object that runs it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from einplan.compiler.plan import Plan
from einplan.formats.peft import init_lora, load_adapter
from einplan.formats.weights import WeightsError, load_weights, random_weights, weights_config
from einplan.models.config import ModelConfig, config_differences, parse_config
from einplan.runtime.executor import Executor, InputError
from einplan.runtime.recorder import Recorder


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
