"""A plan bound to weights: the object that runs it (forward, generate, loss and gradients)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from einplan.apps.gradients import check_targets, loss_feed, named_grads, shifted_targets
from einplan.apps.prompts import Prompts, collect_eos_ids, encode_prompts
from einplan.compiler.plan import Plan, PlanError
from einplan.errors import EinplanError
from einplan.formats.checkpoint import verified_source, verified_weights
from einplan.formats.peft import init_lora, load_adapter
from einplan.formats.tokenizer import load_tokenizer, load_tokenizer_config, weights_tokenizer
from einplan.formats.weights import (
    WeightsError,
    load_weights,
    random_weights,
    resolve_weights_dir,
    weights_config,
)
from einplan.models.config import ModelConfig, config_differences, parse_config, to_hf_config
from einplan.models.llama import dim_limits
from einplan.runtime.backends import get_backend
from einplan.runtime.device import to_device
from einplan.runtime.executor import Executor, InputError
from einplan.runtime.generate import Generation, GenerationRequest, Generator
from einplan.runtime.recorder import Recorder
from einplan.runtime.sampling import SamplingConfig


def load_plan(path: str | Path) -> Plan:
    """Read a plan file (clear errors for foreign, damaged or other-version files), and check
    its entries' dim limits against the config it was compiled from."""
    plan = Plan.load(path)
    check_dim_limits(plan, path)
    return plan


def check_dim_limits(plan: Plan, path: str | Path) -> None:
    """Every entry declares a dim's limit as its config sets it (max_batch,
    max_position_embeddings): a larger one would let inputs past what the model serves (rotary
    positions, the KV cache), a smaller one refuse sizes it serves."""
    batch, positions = plan.config.get("max_batch"), plan.config.get("max_position_embeddings")
    if type(batch) is not int or type(positions) is not int:
        return  # a damaged config is refused where it is read, by name
    limits = dim_limits(batch, positions)
    for name, graph in plan.entries.items():
        for dim, size in graph.dims.items():
            if dim in limits and size != limits[dim]:
                raise PlanError(
                    f"{path}: entry {name!r}: dims.{dim} is {size}, but the plan's config "
                    f"makes it {limits[dim]} (max_batch {batch}, max_position_embeddings "
                    f"{positions}); recompile it"
                )


def plan_config(plan: Plan) -> ModelConfig:
    """The normalised model config a plan was compiled from, checked as a config.json would be
    (its types, sizes and values): a plan file's checksum does not vouch for what wrote it."""
    raw = dict(plan.config)
    if not raw:
        return parse_config(raw)
    try:
        cfg = ModelConfig(**raw)
        parse_config(to_hf_config(cfg), "the plan's model config")
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise PlanError(f"the plan's model config is damaged ({e}); recompile the plan") from None
    return cfg


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


def require_entries(plan: Plan, entries: tuple[str, ...], call: str, how: str) -> None:
    """Refuse a call whose entries the plan lacks, saying how to compile them."""
    missing = [e for e in entries if e not in plan.entries]
    if missing:
        raise EinplanError(
            f"{call} needs the plan's {' and '.join(entries)} "
            f"entr{'y' if len(entries) == 1 else 'ies'}; this plan has "
            f"{', '.join(plan.entries)}: compile it with {how}"
        )


def check_same_tokenizer(target: Session, draft: Session) -> None:
    """Refuse a draft model whose token ids mean other text than the target's."""
    why = None
    if draft.config.vocab_size != target.config.vocab_size:
        why = f"vocabularies of {draft.config.vocab_size} and {target.config.vocab_size} tokens"
    elif (draft.tokenizer is None) != (target.tokenizer is None):
        why = "one of them has no tokenizer"
    elif draft.tokenizer is not None and (
        draft.tokenizer.get_vocab() != target.tokenizer.get_vocab()
    ):
        why = "their tokenizers map text to different ids"
    if why:
        raise EinplanError(
            f"the draft model's tokenizer differs from the target's ({why}): speculative "
            "decoding needs a draft of the same tokenizer (e.g. a smaller model of the family)"
        )


class Session:
    """A plan bound to weights: ``forward`` logits, ``generate`` text, ``loss_and_grads``."""

    def __init__(
        self,
        plan: Plan | str | Path,
        weights: str | os.PathLike | dict | None = None,
        *,
        random_seed: int | None = None,
        workers: int = 0,
        adapter: str | os.PathLike | None = None,
        lora_seed: int = 0,
        tokenizer: str | os.PathLike | Tokenizer | None = None,
        kernels: str | None = None,
        device: str | None = None,
        cuda_graph: bool = True,
        tf32: bool = False,
    ) -> None:
        """Bind ``weights`` (HF folder, safetensors file, hub id, GGUF file, or a dict of
        arrays under Hugging Face names), or
        seeded random weights when ``random_seed`` is given instead. One of the two is needed:
        there is no silent random fallback. A plan with LoRA takes its A and B from
        ``adapter`` (a PEFT folder made for these weights) or, without one, fresh ones
        (``lora_seed``; B is zero, so the logits are the base model's). ``tokenizer``
        (tokenizer.json or its folder, ``"bytes"``, or a Tokenizer) defaults to the one that
        came with the weights; ``self.tokenizer`` is None when there is none. ``kernels``
        picks the kernels backend, ``"numpy"`` or ``"numba"`` (None: the fastest installed);
        the plan is the same whichever runs it. ``device="cuda"`` runs it on an NVIDIA GPU
        (CuPy): the weights are uploaded once, each bound entry is replayed as one CUDA graph
        (``cuda_graph=False``: launched step by step), ``tf32`` lets float32 products use
        TF32 tensor cores; outputs come back as NumPy arrays."""
        self.plan = plan if isinstance(plan, Plan) else load_plan(plan)
        self.config = plan_config(self.plan)
        self.workers = workers
        self.kernels = get_backend(kernels, device, cuda_graph, tf32)
        graph = self.plan.entry("forward")
        if (weights is None) == (random_seed is None):
            raise ValueError(
                "give either weights or random_seed (random weights), not both or neither"
            )
        self.source = None
        if not isinstance(weights, dict | None):
            self.source = verified_weights(resolve_weights_dir(weights))
            weights = self.source
        if random_seed is not None:
            arrays = random_weights(graph, random_seed)
        else:
            if not isinstance(weights, dict):
                check_weights_config(self.config, weights)
            arrays = load_weights(graph, weights, tied=self.config.tie_word_embeddings)
        if adapter is not None:
            arrays.update(load_adapter(verified_source(Path(adapter)), graph, arrays))
        else:
            arrays.update(init_lora(graph, lora_seed))
        device = self.kernels.device
        placed = {k: to_device(a, device, k) for k, a in arrays.items()}
        del arrays  # packing replaces arrays one by one: nothing else may hold them
        self.weights = self.kernels.pack_weights(self.plan, placed)  # numba: panels
        self.executor = Executor(graph, self.weights, workers, self.kernels)
        if isinstance(tokenizer, Tokenizer):
            self.tokenizer: Tokenizer | None = tokenizer
        elif tokenizer is not None:
            self.tokenizer = load_tokenizer(str(tokenizer), self.source)
        else:
            self.tokenizer = weights_tokenizer(self.source) if self.source else None

    @cached_property
    def tokenizer_config(self) -> dict:
        """tokenizer_config.json beside the weights (chat template, special tokens), or {}."""
        return load_tokenizer_config(self.source)

    @cached_property
    def eos_ids(self) -> list[int]:
        """The ids that end a row: the config's, generation_config.json's beside the weights,
        and the tokenizer's eos token."""
        return collect_eos_ids(
            self.config.eos_token_id, self.source, self.tokenizer, self.tokenizer_config
        )

    @cached_property
    def generator(self) -> Generator:
        """The prefill and decode entries over these weights."""
        how = "einplan.compile_model(config) (its default entries) or einplan compile CONFIG"
        require_entries(self.plan, ("prefill", "decode"), "generate", how)
        return Generator(self.plan, self.weights, self.workers, self.kernels)

    @cached_property
    def grad_executor(self) -> Executor:
        """The ``grad`` entry over these weights."""
        how = 'einplan.compile_model(config, entries=("forward", "grad"))'
        require_entries(self.plan, ("grad",), "loss_and_grads", how)
        return Executor(self.plan.entry("grad"), self.weights, self.workers, self.kernels)

    def check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids as ``(batch, seq)`` integers in the vocabulary (one row may be 1-D)."""
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
        return tokens

    def forward(
        self,
        tokens: np.ndarray,
        positions: np.ndarray | None = None,
        recorder: Recorder | None = None,
    ) -> np.ndarray:
        """Logits, float32 ``(batch, seq, vocab)``, for integer token ids ``(batch, seq)``."""
        tokens = self.check_tokens(tokens)
        if positions is None:
            positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
        out = self.executor.run({"tokens": tokens, "positions": positions}, recorder)
        return out["logits"]

    def generate(
        self,
        prompts: Prompts,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        stream: Callable[[int, str], None] | None = None,
        ctx: int | None = None,
        recorder: Recorder | None = None,
        draft: Session | None = None,
        draft_tokens: int = 4,
    ) -> Generation:
        """Continue each prompt (text, or token ids; one, or a list of them) by up to
        ``max_new_tokens`` tokens, greedy unless ``temperature`` > 0. A row stops at an EOS
        id (unless ``ignore_eos``), once its text holds a ``stop`` string, at the token limit,
        or when the ``ctx``-slot cache is full. ``stream(row, piece)`` is called with each
        piece of text as it is made. Text (prompts, texts, stop, stream) needs the session's
        tokenizer; without one, the result's texts are empty. With a ``draft`` session (a
        small model of the same tokenizer), decoding is speculative: the draft proposes
        ``draft_tokens`` tokens a step and the target (whose plan needs the ``verify`` entry)
        keeps them by rejection sampling, so the output follows the target's distribution
        (greedy: the same tokens); one prompt at a time."""
        ids = encode_prompts(prompts, self.tokenizer, self.config.vocab_size)
        stop = [stop] if isinstance(stop, str) else list(stop)
        if self.tokenizer is None and (stop or stream):
            raise EinplanError(
                "stop strings and stream work on text, and this session has no tokenizer: "
                "give Session(..., tokenizer=PATH or 'bytes')"
            )
        sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty, seed)
        eos = () if ignore_eos else self.eos_ids
        request = GenerationRequest(ids, max_new_tokens, sampling, eos, stop, ctx)
        decode = self.decode if self.tokenizer is not None else None
        if draft is not None:
            return self._speculate(draft, draft_tokens, request, decode, stream, recorder)
        return self.generator.generate(request, decode, stream, recorder)

    def _speculate(self, draft, k, request, decode, stream, recorder) -> Generation:
        from einplan.runtime.speculative import speculative_generate

        if self.kernels.device != "cpu" or draft.kernels.device != "cpu":
            raise EinplanError("speculative decoding runs on the cpu for now; use --device cpu")
        check_same_tokenizer(self, draft)
        rows = []
        for r, prompt in enumerate(request.prompts):  # one prompt at a time
            one = dataclasses.replace(request, prompts=[prompt])
            on_text = (lambda _, piece, r=r: stream(r, piece)) if stream else None
            rows.append(
                speculative_generate(
                    (self.plan, self.weights),
                    (draft.plan, draft.weights),
                    one,
                    k,
                    self.workers,
                    decode,
                    on_text,
                    recorder,
                )
            )
        if len(rows) == 1:
            return rows[0]
        stats = rows[0].stats
        for g in rows[1:]:
            stats.decode_step_s += g.stats.decode_step_s
            stats.draft_tokens += g.stats.draft_tokens
            stats.accepted_tokens += g.stats.accepted_tokens
        return Generation(
            [g.tokens[0] for g in rows],
            [g.texts[0] for g in rows],
            [g.stop_reasons[0] for g in rows],
            stats,
        )

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (special tokens left out)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def loss_and_grads(
        self, tokens: np.ndarray, targets: np.ndarray | None = None
    ) -> tuple[np.floating, dict[str, np.ndarray]]:
        """Mean next-token cross entropy of ``tokens`` (batch, seq) and its gradient for
        every weight, keyed by checkpoint name, in the plan's compute dtype. ``targets[b, t]``
        is the token expected after position t (-100: ignored); by default the next token,
        the last position ignored, as transformers' ``labels=input_ids``."""
        executor = self.grad_executor
        tokens = self.check_tokens(tokens)
        vocab = self.config.vocab_size
        if targets is None:
            targets = shifted_targets(tokens)
        out = executor.run(loss_feed(tokens, check_targets(targets, tokens.shape, vocab)))
        return out["loss"][()], named_grads(out)
