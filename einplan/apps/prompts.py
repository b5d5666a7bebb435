"""What ``Session.generate`` takes and stops on: prompts (text or token ids, one or a batch)
as token id lists, and the EOS ids a model's files name."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from einplan.errors import EinplanError

Prompts = str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]] | np.ndarray


def encode_prompts(prompts: Prompts, tokenizer: Tokenizer | None, vocab: int) -> list[list[int]]:
    """Token id lists for one prompt or a batch: text (encoded by ``tokenizer``) or ids
    (checked to lie in the vocabulary)."""
    if isinstance(prompts, str | np.ndarray):
        prompts = [prompts] if isinstance(prompts, str) else prompts.tolist()
    prompts = list(prompts)
    if prompts and all(isinstance(t, int | np.integer) for t in prompts):
        prompts = [prompts]  # one prompt of ids
    return [encode_prompt(p, tokenizer, vocab) for p in prompts]


def encode_prompt(
    prompt: str | Sequence[int], tokenizer: Tokenizer | None, vocab: int
) -> list[int]:
    """One prompt as token ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise EinplanError(
                "text prompts need a tokenizer, and this session has none (no tokenizer.json "
                "beside the weights): give Session(..., tokenizer=PATH or 'bytes'), or token ids"
            )
        ids = tokenizer.encode(prompt).ids
        if ids and max(ids) >= vocab:
            raise EinplanError(
                f"the tokenizer gave token id {max(ids)}, beyond the model's vocabulary of "
                f"{vocab} ids (its vocabulary has {tokenizer.get_vocab_size()}): give the "
                "tokenizer the model was trained with (--tokenizer)"
            )
        return ids
    ids = list(prompt)
    if not all(isinstance(t, int | np.integer) for t in ids):
        raise EinplanError(
            "a prompt is text or a list of integer token ids; a batch is a list of prompts"
        )
    if ids and (min(ids) < 0 or max(ids) >= vocab):
        raise EinplanError(f"token ids must lie in 0..{vocab - 1}, got {min(ids)}..{max(ids)}")
    return [int(t) for t in ids]


def collect_eos_ids(
    config_eos: list[int], weights: Path | None, tokenizer: Tokenizer | None, tk_cfg: dict
) -> list[int]:
    """EOS ids from the model config, generation_config.json beside the weights, and the
    tokenizer's eos token."""
    ids = set(config_eos)
    if weights is not None and weights.suffix != ".gguf":
        gen = (weights if weights.is_dir() else weights.parent) / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
    eos_text = tk_cfg.get("eos_token")
    if isinstance(eos_text, dict):
        eos_text = eos_text.get("content")
    if eos_text and tokenizer is not None and tokenizer.token_to_id(eos_text) is not None:
        ids.add(tokenizer.token_to_id(eos_text))
    return sorted(ids)
