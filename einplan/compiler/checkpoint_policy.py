"""Activation checkpointing policies: which forward values a training step keeps for its
reverse graph and which it computes again there (passes/checkpoint.py applies them).

``none`` keeps every value the reverse graph reads; ``layers`` keeps each layer's input and
recomputes the layer; ``every:K`` keeps the input of every K-th layer and recomputes K layers
at a time; ``selective`` keeps matmul outputs and recomputes the elementwise ops whose inputs
are kept anyway (norms, the SwiGLU product).
"""

from __future__ import annotations

from dataclasses import dataclass

from einplan.errors import EinplanError

POLICIES = ("none", "layers", "every:K", "selective")


class CheckpointError(EinplanError):
    """A checkpointing policy string that names no policy."""


@dataclass(frozen=True)
class CheckpointPolicy:
    """A parsed policy: ``kind`` (none, segments, selective) and, for segments, the number of
    layers recomputed together."""

    kind: str
    every: int = 1

    def segment_of(self, layer: int) -> int:
        """The segment (recomputed from one kept input) layer ``layer`` belongs to."""
        return layer // self.every


def parse_checkpoint(text: str) -> CheckpointPolicy:
    """Parse ``none``, ``layers``, ``every:K`` (K >= 1) or ``selective``; anything else is a
    :class:`CheckpointError` naming the accepted forms."""
    if not isinstance(text, str):
        raise CheckpointError(f"checkpoint policy must be a string, got {text!r}")
    if text in ("none", "selective"):
        return CheckpointPolicy(text)
    if text == "layers":
        return CheckpointPolicy("segments", 1)
    head, sep, k = text.partition(":")
    if head == "every" and sep:
        if k.isdigit() and int(k) >= 1:
            return CheckpointPolicy("segments", int(k))
        raise CheckpointError(
            f"checkpoint policy {text!r}: K in every:K must be a whole number >= 1 "
            "(every:2 keeps the input of every second layer)"
        )
    raise CheckpointError(f"unknown checkpoint policy {text!r}: use one of {', '.join(POLICIES)}")
