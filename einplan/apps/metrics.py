"""The training log: one record per log line, appended to ``metrics.jsonl`` and
``metrics.csv`` (for machines) as the run goes; a resumed run first drops the records of
steps after its checkpoint, so the files read as one uninterrupted run. A torn last line (a
kill mid-write) is dropped with a warning; a damaged line before it is an error."""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any

from einplan.errors import EinplanError
from einplan.formats.files import write_atomic

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
    "loss_scale",  # f16 training: the dynamic loss scale of the step, else empty
    "allreduce_ms",  # data-parallel (--dp): the step's all-reduce, else empty
    "allreduce_fraction",  # ... and its share of the step
)


class MetricsLog:
    """Appends training records to ``metrics.jsonl`` and ``metrics.csv`` in a run folder."""

    def __init__(self, folder: Path, resume_step: int | None = None) -> None:
        """Start the files afresh, or (``resume_step``) keep the records up to that step."""
        self.jsonl, self.csv = folder / "metrics.jsonl", folder / "metrics.csv"
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.jsonl.exists():
            records = read_records(self.jsonl)
            self.records = [r for r in records if r["step"] <= resume_step]
        write_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.records))
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.records)
        write_atomic(self.csv, table.getvalue())

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to both files."""
        self.records.append(record)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow(record)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line is dropped with a warning, any
    other line that is not a record is an error naming it."""
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer step")
        except ValueError as e:
            if number < len(lines):
                raise EinplanError(
                    f"{path}: line {number} is damaged ({e}); repair or delete that line "
                    "and resume again"
                ) from None
            warnings.warn(f"{path}: dropped a torn last line ({line[:40]!r})", stacklevel=2)
            continue
        records.append(record)
    return records
