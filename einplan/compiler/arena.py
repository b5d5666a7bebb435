"""Where each step's buffer lies in the runtime's one arena, for bound dims.

The memory pass (passes/memory.py) gives every computed value a ``slot`` and says after which
step it dies (``free_after``); slots are reused only by values of the same symbolic size, so
their sum overstates what is alive at once. This layout places each value at a byte offset
of one arena instead, by the value's lifetime in dependency levels: from the level of the step
that writes it to the level of the step that frees it, both included (steps of one level may
run together on the thread pool, so a buffer freed in a level is reused only in a later one).
An in-place step (its slot is its dying first input's) keeps its input's offset.

Values are placed in execution order, each in the smallest free gap that holds it (best fit)
or at the arena's end; freed gaps merge with their neighbours. The memory estimate
(passes/memory.py) and the runtime (runtime/steps.py) both use this function, so the estimate
is the arena the runtime allocates.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass

from einplan.compiler.ir import Graph
from einplan.compiler.ops import ITEMSIZE, LEAVES, OPS
from einplan.compiler.symbolic import evaluate, numel

ALIGN = 64  # bytes: every buffer starts on a cache line


@dataclass
class ArenaLayout:
    """Byte offset of each buffered step's value and the arena's total size."""

    offsets: dict[int, int]
    nbytes: int


def round_up(n: int, to: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``to``."""
    return -(-n // to) * to


def plan_arena(graph: Graph, dims: dict[str, int]) -> ArenaLayout:
    """Lay out the values of ``graph``'s slotted steps in one arena for ``dims``."""
    ann = graph.annotations
    root: dict[int, int] = {}
    freed_level: dict[int, int] = {}  # value -> level of the step that frees it
    for n in graph.nodes:
        root[n.id] = root[n.inputs[0]] if n.op not in LEAVES and OPS[n.op].alias else n.id
        if n.op not in LEAVES:
            for v in ann[n.id].free_after or ():
                freed_level[v] = ann[n.id].level
    never = 1 + max((a.level for a in ann.values()), default=0)
    blocks: list[list[int]] = []  # [start level, end level, size]
    block_of: dict[int, int] = {}
    slot_of: dict[int, int] = {}
    for n in graph.nodes:
        if n.op in LEAVES or ann[n.id].slot is None:
            continue
        a = ann[n.id]
        slot_of[n.id] = a.slot
        end = freed_level.get(n.id, never)
        first = root[n.inputs[0]] if n.inputs else None
        if (
            OPS[n.op].inplace
            and first in block_of
            and slot_of.get(first) == a.slot
            and first in (a.free_after or ())
        ):  # written over its dying first input: the same bytes
            b = block_of[first]
            blocks[b][1] = max(blocks[b][1], end)
        else:
            size = evaluate(numel(n.shape), dims) * ITEMSIZE[n.dtype]
            b = len(blocks)
            blocks.append([a.level, end, round_up(max(size, 1))])
        block_of[n.id] = b
    placed = place_blocks(blocks)
    offsets = {v: placed[b] for v, b in block_of.items()}
    total = max((placed[b] + blocks[b][2] for b in range(len(blocks))), default=0)
    return ArenaLayout(offsets, total)


def place_blocks(blocks: list[list[int]]) -> list[int]:
    """Offsets of ``blocks`` ([start, end, size], in order of start) by best fit over the
    gaps that blocks ending before each start have left."""
    offsets = [0] * len(blocks)
    gaps: list[tuple[int, int]] = []  # (offset, size), sorted by offset
    live: list[tuple[int, int]] = []  # heap of (end level, block)
    top = 0  # the arena's end so far
    for b, (start, _end, size) in enumerate(blocks):
        while live and live[0][0] < start:
            _, d = heapq.heappop(live)
            release(gaps, offsets[d], blocks[d][2])
        fits = [g for g in gaps if g[1] >= size]
        if fits:
            off, gsize = min(fits, key=lambda g: (g[1], g[0]))
            gaps.remove((off, gsize))
            if gsize > size:
                bisect.insort(gaps, (off + size, gsize - size))
        elif gaps and gaps[-1][0] + gaps[-1][1] == top:  # grow the last gap at the end
            off = gaps.pop()[0]
            top = off + size
        else:
            off, top = top, top + size
        offsets[b] = off
        heapq.heappush(live, (blocks[b][1], b))
    return offsets


def release(gaps: list[tuple[int, int]], off: int, size: int) -> None:
    """Return ``[off, off+size)`` to the sorted ``gaps``, merged with the gaps it touches."""
    k = bisect.bisect_left(gaps, (off, 0))
    if k < len(gaps) and gaps[k][0] == off + size:  # merge with the gap after
        size += gaps.pop(k)[1]
    if k > 0 and gaps[k - 1][0] + gaps[k - 1][1] == off:  # and the one before
        poff, psize = gaps.pop(k - 1)
        off, size = poff, psize + size
        k -= 1
    gaps.insert(k, (off, size))
