"""Tokenizers through the ``tokenizers`` library: a model's tokenizer.json, or a byte-level
tokenizer (256 ids, one per byte) for configs like tiny.json that have no trained vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from einplan.errors import EinplanError


class TokenizerError(EinplanError):
    """No usable tokenizer was found or given."""


def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: each byte as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def byte_tokenizer() -> Tokenizer:
    """A tokenizer mapping each byte of UTF-8 text to its own id (0..255)."""
    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_tokenizer(spec: str | None, weights: Path | None = None) -> Tokenizer:
    """``"bytes"``, a tokenizer.json path or folder, or (spec None) the tokenizer that came
    with the weights (their folder's tokenizer.json, or a GGUF file's vocabulary)."""
    if spec == "bytes":
        return byte_tokenizer()
    path = Path(spec) if spec else weights
    if path is None:
        raise TokenizerError(
            "no tokenizer: give --tokenizer PATH (tokenizer.json or its folder), "
            "--tokenizer bytes, or weights in a folder with tokenizer.json"
        )
    if path.suffix == ".gguf":
        from einplan.formats.gguf import read_gguf

        return read_gguf(path).tokenizer
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer {str(path)!r} not found (a weights folder needs tokenizer.json; "
            "or give --tokenizer)"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises bare Exception on bad files
        raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None


def weights_tokenizer(weights: Path) -> Tokenizer | None:
    """The tokenizer that came with the weights (their folder's tokenizer.json, or a GGUF
    file's vocabulary), or None when they have none."""
    folder = weights.parent if weights.is_file() else weights
    if weights.suffix == ".gguf" or (folder / "tokenizer.json").is_file():
        return load_tokenizer(None, weights)
    return None


def load_tokenizer_config(weights: Path | None) -> dict:
    """tokenizer_config.json beside the weights (chat template, special tokens), or {}."""
    if weights is None:
        return {}
    if weights.suffix == ".gguf":
        from einplan.formats.gguf import read_gguf

        return read_gguf(weights).tokenizer_config
    path = (weights if weights.is_dir() else weights.parent) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def hf_tokenizer_config(
    tok: Tokenizer, bos_id: int | None, eos_ids: list[int], max_length: int
) -> dict:
    """A Hugging Face ``tokenizer_config.json`` for ``tok`` (loaded by transformers'
    ``AutoTokenizer`` beside tokenizer.json): its special tokens by their text, or None."""

    def text(i: int | None) -> str | None:
        return None if i is None else tok.id_to_token(i)

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(bos_id),
        "eos_token": text(eos_ids[0] if eos_ids else None),
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }


def train_tokenizer(corpus: Path, vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer of ``vocab_size`` ids learned from a text file (every byte
    is in its alphabet, so any text encodes)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with open(corpus, encoding="utf-8") as f:
        lines = tqdm(f, desc="learn tokenizer (read)", unit="line", delay=2)
        tok.train_from_iterator(lines, trainer)
    return tok
