"""Views of a training run's records: the summary table and the loss-curve picture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from einplan.errors import EinplanError


def print_training_summary(records: list[dict[str, Any]], console: Console) -> None:
    """A table of the logged steps: loss, validation loss, phase times, peak memory."""
    t = Table(title="training summary")
    for col in ("step", "loss", "val loss", "FWD ms", "BWD ms", "OPT ms", "tok/s", "peak MiB"):
        t.add_column(col, justify="right")
    for r in records:
        t.add_row(
            str(r["step"]),
            f"{r['loss']:.4f}",
            f"{r['val_loss']:.4f}",
            f"{r['forward_ms']:.0f}",
            f"{r['backward_ms']:.0f}",
            f"{r['optimizer_ms']:.0f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['peak_rss_mib']:,.0f}",
        )
    console.print(t)


def print_activation_memory(
    policy: str, estimated: int, allocated: int, peak_rss_mib: float, console: Console
) -> None:
    """One line comparing the memory pass's activation estimate of the train step (buffers and
    the kernels' scratch) with the arena the runtime allocated for it (the same) and the
    process's peak RSS."""
    console.print(
        f"train_step activations (checkpointing {policy}): estimated {estimated / 2**20:,.1f} "
        f"MiB, runtime arena {allocated / 2**20:,.1f} MiB; process peak RSS "
        f"{peak_rss_mib:,.0f} MiB",
        markup=False,
    )


def every_step_loss(records: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """The training loss of every step the records cover (each record's ``step_losses`` end
    at its step); a record without them gives its own step's loss only."""
    steps: list[int] = []
    losses: list[float] = []
    for r in records:
        per_step = r.get("step_losses") or [r["loss"]]
        steps += range(r["step"] - len(per_step) + 1, r["step"] + 1)
        losses += per_step
    return steps, losses


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> None:
    """Training and validation loss against step, as a PNG (needs the ``plots`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EinplanError(
            "the loss curve needs matplotlib: pip install 'einplan[plots]'"
        ) from None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*every_step_loss(records), label="train loss")
    ax.plot(steps, [r["val_loss"] for r in records], label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
