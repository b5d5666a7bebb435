"""Training data: a corpus tokenized once into a memory-mapped token file, split into a
training part and a held-out tail, and seeded random windows drawn from it.

The token file is named by a hash of the corpus and the tokenizer, so a second run (or a
resumed one) maps the same file instead of tokenizing again, and a changed corpus is noticed.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from einplan.errors import EinplanError
from einplan.formats.files import hash_file, write_atomic

CHUNK_CHARS = 1 << 20  # text tokenized per call (cut at a line end)


class DataError(EinplanError):
    """The corpus is missing, unreadable, or too short for the sequence length."""


def encode_text(text: str, tokenizer: Tokenizer) -> np.ndarray:
    """Token ids of a long text, encoded in chunks that end at line breaks."""
    parts, start = [], 0
    with tqdm(total=len(text), desc="tokenize", unit="char", unit_scale=True, delay=2) as bar:
        while start < len(text):
            end = text.find("\n", start + CHUNK_CHARS)
            end = len(text) if end < 0 else end + 1
            parts.append(np.asarray(tokenizer.encode(text[start:end]).ids, dtype=np.int64))
            bar.update(end - start)
            start = end
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def tokenize_corpus(corpus: Path, tokenizer: Tokenizer, cache_dir: Path) -> tuple[np.ndarray, str]:
    """The corpus as a memory-mapped token array (written once into ``cache_dir``, atomically)
    and the hash that names it."""
    if not corpus.is_file():
        raise DataError(f"corpus {str(corpus)!r} not found (give a UTF-8 text file with --data)")
    key = hashlib.sha256((hash_file(corpus) + tokenizer.to_str()).encode()).hexdigest()[:16]
    path = cache_dir / f"tokens-{key}.npy"
    if not path.exists():
        try:
            text = corpus.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{corpus}: not UTF-8 text ({e})") from None
        ids = encode_text(text, tokenizer)
        dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
        buf = io.BytesIO()
        np.save(buf, ids.astype(dtype))
        write_atomic(path, buf.getvalue())
    return np.load(path, mmap_mode="r"), key


@dataclass
class TokenSplits:
    """The training tokens and the held-out validation tokens of one corpus."""

    train: np.ndarray
    val: np.ndarray
    key: str  # names the corpus + tokenizer

    @classmethod
    def split(cls, ids: np.ndarray, key: str, val_fraction: float, seq_len: int) -> TokenSplits:
        """Hold out the last ``val_fraction`` of the tokens; both parts must fit a window."""
        n_val = int(len(ids) * val_fraction)
        if n_val <= seq_len or len(ids) - n_val <= seq_len:
            raise DataError(
                f"corpus has {len(ids):,} tokens: too few for windows of {seq_len + 1} in both "
                f"the training part and the held-out {val_fraction:.0%}"
            )
        return cls(ids[:-n_val], ids[-n_val:], key)


class BatchSampler:
    """Seeded random windows of ``seq_len + 1`` tokens (inputs and next-token targets); its
    state (generator state and windows drawn) goes into checkpoints for an exact resume."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.drawn = 0

    def draw(self, batch: int) -> np.ndarray:
        """The next ``(batch, seq_len + 1)`` windows, as int64."""
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len, size=batch)
        self.drawn += batch
        return np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)

    def state(self) -> dict[str, Any]:
        """JSON-ready state: the generator's and how many windows were drawn."""
        return {"rng": self.rng.bit_generator.state, "drawn": self.drawn}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where :meth:`state` was taken."""
        self.rng.bit_generator.state = state["rng"]
        self.drawn = state["drawn"]


def validation_windows(tokens: np.ndarray, seq_len: int, count: int) -> list[np.ndarray]:
    """``count`` fixed, evenly spaced windows of the held-out tokens (the same every time)."""
    last = len(tokens) - seq_len - 1
    starts = np.linspace(0, last, num=count).astype(np.int64)
    return [tokens[s : s + seq_len + 1].astype(np.int64) for s in starts]
