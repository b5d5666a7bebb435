"""The memory a run may still allocate, and the check made before each large allocation
(arena, KV cache, optimizer state): a run too big for the machine stops with the numbers and
what to lower instead of being killed by the operating system."""

from __future__ import annotations

import os
import re
from pathlib import Path

from einplan.errors import EinplanError

LIMIT_ENV = "EINPLAN_MEMORY_LIMIT"
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# dims whose size a user picks (batch size, sequence length, KV cache context)
SIZE_DIMS = ("batch", "seq", "ctx")


class MemoryLimitError(EinplanError):
    """A run needs more memory than the machine has available."""


def parse_bytes(text: str) -> int:
    """Bytes from ``"2G"``, ``"512M"``, ``"1.5GiB"`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise EinplanError(
            f"{LIMIT_ENV}={text!r} is not a size: give bytes or a number with K, M, G or T"
        )
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def available_memory() -> int:
    """Bytes this process may still allocate: ``EINPLAN_MEMORY_LIMIT`` when set, else the
    kernel's MemAvailable (/proc/meminfo), else free physical pages."""
    if os.environ.get(LIMIT_ENV):
        return parse_bytes(os.environ[LIMIT_ENV])
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def human_bytes(nbytes: int) -> str:
    """Bytes in the largest of KiB, MiB, GiB that leaves at least 1."""
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):,.2f} {unit}"
    return f"{nbytes / 1024:,.2f} KiB"


def check_fits(
    nbytes: int, what: str, dims: dict[str, int], remedy: str = "", gpu_free: int | None = None
) -> None:
    """Raise :class:`MemoryLimitError` when ``nbytes`` for ``what`` exceed the available
    memory (``gpu_free``: the free bytes of the GPU they go to), saying what to lower:
    ``remedy``, else the bound sizes of ``dims``."""
    available = available_memory() if gpu_free is None else gpu_free
    if nbytes <= available:
        return
    sizes = [f"{d} (now {dims[d]:,})" for d in SIZE_DIMS if d in dims]
    lower = remedy or (
        f"lower {', '.join(sizes)}" if sizes else "use a smaller model or a larger machine"
    )
    if gpu_free is not None:
        raise MemoryLimitError(
            f"{what} needs {human_bytes(nbytes)} but only {human_bytes(available)} of GPU "
            f"memory is free; {lower}"
        )
    raise MemoryLimitError(
        f"{what} needs {human_bytes(nbytes)} but only {human_bytes(available)} of memory is "
        "available; "
        f"{lower} ({LIMIT_ENV} sets the limit einplan checks against)"
    )
