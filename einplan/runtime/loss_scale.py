"""Dynamic loss scaling for f16 training (as torch.amp.GradScaler).

f16 has five exponent bits: small gradients underflow to zero. The loss's cotangent is
multiplied by a scale S, so every gradient in the reverse graph is S times larger, and the
plan unscales each weight's gradient (in float32) before accumulating it (its
``inv_loss_scale`` input, compiler/passes/optimizer.py). A step whose gradient overflowed is
not finite: the plan skips it, and the scale halves; after ``interval`` steps without one the
scale doubles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

INITIAL_SCALE = 2.0**16
GROWTH_INTERVAL = 2000


@dataclass
class LossScale:
    """The current scale and the steps applied since it last changed."""

    scale: float = INITIAL_SCALE
    good_steps: int = 0
    interval: int = GROWTH_INTERVAL

    def update(self, skipped: bool) -> None:
        """After a step: halve the scale when it was skipped, double it after ``interval``
        applied steps in a row."""
        if skipped:
            self.scale /= 2
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.interval:
            self.scale *= 2
            self.good_steps = 0

    def to_dict(self) -> dict[str, float]:
        """Plain data for checkpoints."""
        return asdict(self)
