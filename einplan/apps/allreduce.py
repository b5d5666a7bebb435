"""All-reduce of NumPy gradient buffers between Ray workers, through Ray's object store.

Ray's collective library (``ray.util.collective``) moves CPU arrays only through its gloo
backend, which needs ``pygloo`` (no wheels for current Pythons); its NCCL backend needs GPUs
and cupy. So the reduction is written here, once, on the object store: a reduce-scatter in
which rank c fetches chunk c of every rank's buffer and adds them in rank order 0, 1, ...,
N-1, then an all-gather of the summed chunks. Each rank sends and receives 2(N-1)/N of the
buffer (a ring all-reduce's traffic) in two rounds instead of a ring's 2(N-1), and every rank
ends with the same bytes, so a data-parallel run is reproducible. Adding in rank order is the
single process's order when each rank holds one micro-batch's gradient (accumulation 1).

Workers meet through ``exchange(phase, value)``: it returns every rank's ``value``, in rank
order, once all have given theirs (apps/distributed.py's coordinator).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import numpy as np

Exchange = Callable[[str, Any], list[Any]]


def chunk_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` ranges covering ``range(size)``, sizes within one."""
    edges = [size * k // parts for k in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def sum_in_rank_order(parts: list[np.ndarray]) -> np.ndarray:
    """``((parts[0] + parts[1]) + parts[2]) + ...`` in a new array of their dtype."""
    total = np.array(parts[0], copy=True)
    for p in parts[1:]:
        total += p
    return total


class ObjectStoreAllReduce:
    """Sums flat buffers over the ranks of a worker group in place (reduce-scatter, then
    all-gather, through Ray's object store), and gathers one small record per rank."""

    def __init__(self, rank: int, size: int, exchange: Exchange) -> None:
        self.rank, self.size, self.exchange = rank, size, exchange
        self.serving: list[Any] = []  # summed chunks the other ranks may still be fetching

    def __call__(self, buffers: list[np.ndarray], record: dict[str, Any]) -> list[dict[str, Any]]:
        """Replace each buffer by its sum over the ranks; every rank's ``record`` (with its
        rank, host and process id), in rank order."""
        import ray

        me, n = self.rank, self.size
        record = {**record, "rank": me, "host": socket.gethostname(), "pid": os.getpid()}
        bounds = [chunk_bounds(b.size, n) for b in buffers]
        # the chunks of this rank's buffers that the other ranks sum
        offered = [
            [None if c == me else ray.put(b[lo:hi]) for c, (lo, hi) in enumerate(bs)]
            for b, bs in zip(buffers, bounds, strict=True)
        ]
        rows = self.exchange("scatter", (offered, record))
        self.serving = []  # every rank is past the previous all-gather: it has them all
        summed = []
        for k, b in enumerate(buffers):
            lo, hi = bounds[k][me]
            fetched = iter(ray.get([rows[r][0][k][me] for r in range(n) if r != me]))
            parts = [b[lo:hi] if r == me else next(fetched) for r in range(n)]
            summed.append(sum_in_rank_order(parts))
        mine = [ray.put(s) for s in summed]
        self.serving = mine
        gathered = self.exchange("gather", mine)
        for k, b in enumerate(buffers):
            others = [r for r in range(n) if r != me]
            for r, chunk in zip(others, ray.get([gathered[r][k] for r in others]), strict=True):
                lo, hi = bounds[k][r]
                b[lo:hi] = chunk
            lo, hi = bounds[k][me]
            b[lo:hi] = summed[k]
        return [row[1] for row in rows]

    def finish(self) -> None:
        """Wait until every rank has fetched this rank's last summed chunks."""
        self.exchange("finish", None)
        self.serving = []
