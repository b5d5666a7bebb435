"""The learning-rate schedule: linear warmup, then cosine decay to a minimum."""

from __future__ import annotations

import math


def learning_rate(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The rate of optimizer step ``step`` (1-based): ``lr * step / warmup`` while warming up,
    then a half cosine from ``lr`` down to ``min_lr`` at step ``total``, ``min_lr`` after."""
    if step <= warmup:
        return lr * step / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / (total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
