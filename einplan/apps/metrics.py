"""The training log: one record per log line, appended to ``metrics.jsonl`` and
``metrics.csv`` (for machines) as the run goes; a resumed run first drops the records of
steps after its checkpoint, so the files read as one uninterrupted run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

COLUMNS = (
    "step",
    "loss",
    "val_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "forward_ms",
    "backward_ms",
    "optimizer_ms",
    "peak_rss_mib",
    "skipped",
    "router_entropy",  # mixture of experts: mean entropy of the routers (nats), else empty
)


class MetricsLog:
    """Appends training records to ``metrics.jsonl`` and ``metrics.csv`` in a run folder."""

    def __init__(self, folder: Path, resume_step: int | None = None) -> None:
        """Start the files afresh, or (``resume_step``) keep the records up to that step."""
        self.jsonl, self.csv = folder / "metrics.jsonl", folder / "metrics.csv"
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.jsonl.exists():
            lines = self.jsonl.read_text().splitlines()
            self.records = [r for r in map(json.loads, lines) if r["step"] <= resume_step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.records)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to both files."""
        self.records.append(record)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow(record)
