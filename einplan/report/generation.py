"""The phase table printed after generation: time to first token, prefill and decode speed,
and where the memory goes."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from einplan.runtime.generate import PhaseStats


def mib(n: int) -> str:
    """Bytes as MiB for people."""
    return f"{n / 2**20:,.1f} MiB"


def print_phase_table(stats: PhaseStats, console: Console | None = None) -> None:
    """Print the phases of one generate call."""
    console = console or Console(stderr=True)
    t = Table(title=f"generation (batch {stats.batch}, prompt {stats.prompt_tokens} tokens)")
    t.add_column("phase")
    t.add_column("value", justify="right")
    t.add_row("time to first token", f"{stats.ttft_s * 1e3:,.1f} ms")
    t.add_row("prefill", f"{stats.prefill_tokens_per_s:,.1f} tok/s")
    t.add_row("decode", f"{stats.decode_tokens_per_s:,.1f} tok/s")
    t.add_row(
        "decode per token p50 / p99",
        f"{stats.decode_ms(0.5):,.2f} / {stats.decode_ms(0.99):,.2f} ms",
    )
    t.add_row("decode steps", str(len(stats.decode_step_s)))
    if stats.draft_tokens:
        t.add_row(
            "draft tokens accepted",
            f"{stats.accepted_tokens:,} / {stats.draft_tokens:,} ({stats.acceptance_rate:.1%})",
        )
    t.add_row("weights", mib(stats.weights_bytes))
    t.add_row("KV cache", mib(stats.kv_cache_bytes))
    t.add_row("activations (buffers)", mib(stats.activations_bytes))
    by = ", ".join(f"{k} {v}" for k, v in sorted(stats.decode_steps_by_backend.items()))
    t.add_row("kernels", f"{stats.backend}" + (f" (decode steps: {by})" if by else ""))
    console.print(t)
