"""What ``Session.loss_and_grads`` feeds the ``grad`` entry and returns: next-token targets
(the ids shifted, as transformers' ``labels=input_ids``; -100 ignored) and the gradients
under checkpoint names."""

from __future__ import annotations

import numpy as np

from einplan.errors import EinplanError
from einplan.runtime.trainer import GRAD_PREFIX

IGNORED = -100  # a target that adds nothing to the loss (transformers' ignore_index)


def shifted_targets(tokens: np.ndarray) -> np.ndarray:
    """Each position's target is the next token; the last position's is ignored."""
    return np.concatenate([tokens[:, 1:], np.full((len(tokens), 1), IGNORED)], axis=1)


def check_targets(targets: np.ndarray, shape: tuple[int, ...], vocab: int) -> np.ndarray:
    """``targets`` as int64 ``(batch, seq)`` like the tokens: ids in the vocabulary or -100."""
    targets = np.asarray(targets)
    if targets.ndim == 1:
        targets = targets[None, :]
    if targets.shape != shape:
        raise EinplanError(
            f"targets must have the tokens' shape {list(shape)}, got {list(targets.shape)}"
        )
    if not np.issubdtype(targets.dtype, np.integer):
        raise EinplanError(f"targets must be integer token ids, got {targets.dtype}")
    bad = (targets != IGNORED) & ((targets < 0) | (targets >= vocab))
    if bad.any():
        raise EinplanError(
            f"targets must lie in 0..{vocab - 1} or be {IGNORED} (ignored), got {targets[bad][0]}"
        )
    return targets.astype(np.int64)


def loss_feed(tokens: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """The ``grad`` entry's inputs: the tokens, their positions, targets, d(loss)/d(loss)."""
    return {
        "tokens": tokens,
        "positions": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape),
        "targets": targets,
        "loss_grad": np.array(1.0),
    }


def named_grads(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``grad`` entry's gradients, keyed by the checkpoint names of their weights."""
    return {k.removeprefix(GRAD_PREFIX): v for k, v in outputs.items() if k.startswith(GRAD_PREFIX)}
