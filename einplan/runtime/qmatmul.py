"""Matrix products with a quantised weight, dequantised a block of rows at a time.

A ``dequantize`` step yields a :class:`QuantizedMatrix` (no float32 copy of the weight); the
einsum that reads it calls :meth:`QuantizedMatrix.matmul` and friends, which unpack one block of
output rows into a small float32 scratch (about ``BLOCK_ELEMENTS`` values, in cache),
multiply, and move on. This reads 1 (int8) or 0.5 (int4) bytes per weight instead of 4, but
each weight still costs one float32 written and read back: that unpacking, not the reading,
bounds the speed (benchmarks/dequant_floor.py measures the parts).

For few rows of input (decode) scales never touch the block: with ``W = s * (u - z)`` per
(row o, group g), ``x . W[o] = sum_g s[o,g] (x_g . u[o,g]) - sum_g s[o,g] z[o,g] sum(x_g)``:
one batched matmul of the raw integer values per group, then a (rows x groups) combination.
Many rows (prefill) dequantise the block in place and run one GEMM.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np

from einplan.compiler.ops import KERNEL_THREADS

BLOCK_ELEMENTS = 1 << 20  # floats per scratch block (4 MiB, in L3): few calls, no DRAM trips
SMALL_ROWS = 16  # inputs of at most this many rows use the per-group path


class Helper:
    """One helper thread that runs half of a product's row blocks while the calling thread
    runs the other half (numpy and BLAS release the GIL inside their loops)."""

    def __init__(self) -> None:
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def _serve(self) -> None:
        while True:
            job = self.todo.get()
            try:
                job()
                self.done.put(None)
            except BaseException as e:  # handed to the caller by wait()
                self.done.put(e)

    def start(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the helper thread."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._serve, name="qmatmul", daemon=True)
            self.thread.start()
        self.todo.put(job)

    def wait(self) -> None:
        """Wait for the job started last; re-raise its exception."""
        error = self.done.get()
        if error is not None:
            raise error


HELPER = Helper()
THREADS = KERNEL_THREADS  # scratch sets a product uses: this thread and the helper


def block_rows(rows: int, cols: int) -> int:
    """Weight rows dequantised at a time: about BLOCK_ELEMENTS floats, and at most half the
    weight, so that no float32 copy of a whole weight ever exists."""
    return max(1, min(-(-rows // 2), BLOCK_ELEMENTS // cols))


def scratch_shapes(rows: int, cols: int, group: int, m: int) -> dict[str, tuple[int, ...]]:
    """Float32 scratch a product with an (rows, cols) quantised weight needs for ``m`` input
    rows: one dequantised block, and for the per-group path its partial sums and the input."""
    n = block_rows(rows, cols)
    shapes = {"dq": (n * cols,), "dq_n": (n * cols // 4,)}
    if m <= SMALL_ROWS:
        shapes["dq_p"] = (cols // group * n * m,)
        shapes["dq_x"] = (cols * m,)
    return shapes


class QuantizedMatrix:
    """An (out, in) weight stored as integers with per-(row, group) scales and zero points."""

    def __init__(
        self,
        q: np.ndarray,
        scale: np.ndarray,
        zero: np.ndarray | None,
        bits: int,
        group: int,
    ) -> None:
        """``q``: (out, in) i8/u8 for 8 bits, (out, in/2) packed u8 for 4 bits (see
        runtime/quantize.py); ``scale`` and ``zero`` (None: symmetric): (out, in/group)."""
        # contiguous rows: the compiled kernels walk them by pointer (no copy when already so)
        q, scale = np.ascontiguousarray(q), np.ascontiguousarray(scale)
        self.q, self.scale, self.bits, self.group = q, scale, bits, group
        self.rows = q.shape[0]
        self.cols = q.shape[1] * (8 // bits)
        self.groups = self.cols // group
        if zero is None and bits == 4:  # symmetric int4 is stored as q + 8
            zero = np.full(scale.shape, 8, np.uint8)
        self.zero = zero
        self.scaled_zero = None if zero is None else (scale * zero).astype(np.float32)
        self.block_rows = block_rows(self.rows, self.cols)
        self._zero_f32: np.ndarray | None = None

    @property
    def zero_f32(self) -> np.ndarray:
        """Zero points as float32 (rows, groups), zeros for symmetric int8 (compiled kernels
        take one layout for every scheme)."""
        if self._zero_f32 is None:
            z = self.zero if self.zero is not None else np.zeros(self.scale.shape, np.uint8)
            self._zero_f32 = np.ascontiguousarray(z, dtype=np.float32)
        return self._zero_f32

    def unpack(
        self, start: int, stop: int, out: np.ndarray, work: np.ndarray | None = None
    ) -> np.ndarray:
        """Write the raw integer values of rows ``start:stop`` into ``out`` (float32, (rows,
        in), rows contiguous): no scale, no zero point. ``work``: float32 scratch of at least
        (rows x in / 4) values for the int4 nibbles (allocated if None)."""
        q = self.q[start:stop]
        if self.bits == 8:
            np.copyto(out, q, casting="unsafe")
            return out
        work = np.empty(2 * q.size, np.uint8) if work is None else work.view(np.uint8)
        low = work[: q.size].reshape(q.shape)
        high = work[q.size : 2 * q.size].reshape(q.shape)
        np.bitwise_and(q, np.uint8(0x0F), out=low)
        np.right_shift(q, np.uint8(4), out=high)
        half = self.cols // 2
        np.copyto(out[:, :half], low, casting="unsafe")
        np.copyto(out[:, half:], high, casting="unsafe")
        return out

    def dequantize_rows(
        self, start: int, stop: int, out: np.ndarray, work: np.ndarray | None = None
    ) -> np.ndarray:
        """Float32 rows ``start:stop`` of the weight into ``out`` (rows, in)."""
        f = self.unpack(start, stop, out, work).reshape(stop - start, self.groups, self.group)
        if self.zero is not None:
            f -= self.zero[start:stop, :, None]
        f *= self.scale[start:stop, :, None]
        return out

    def dequantize(self) -> np.ndarray:
        """The whole float32 matrix (for tests, merges and reports; never in a run)."""
        out = np.empty((self.rows, self.cols), np.float32)
        for r in range(0, self.rows, self.block_rows):
            stop = min(self.rows, r + self.block_rows)
            self.dequantize_rows(r, stop, out[r:stop])
        return out

    def take_rows(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any shape) of the float32 weight into ``out`` (*ids.shape, in):
        an embedding lookup that dequantises only the rows it reads."""
        idx = ids.ravel()
        zero = None if self.zero is None else self.zero[idx]
        picked = QuantizedMatrix(self.q[idx], self.scale[idx], zero, self.bits, self.group)
        flat = out.reshape(-1, self.cols)
        for r in range(0, picked.rows, picked.block_rows):
            stop = min(picked.rows, r + picked.block_rows)
            picked.dequantize_rows(r, stop, flat[r:stop])
        return out

    def matmul(self, x: np.ndarray, out: np.ndarray, scratch: list[dict[str, np.ndarray]]) -> None:
        """``out[m, o] = x[m, :] . W[o, :]`` for (m, in) ``x`` into (m, out) ``out``; the
        row blocks are shared between this thread and the helper (one scratch set each)."""
        m = x.shape[0]
        xg = None
        if m <= SMALL_ROWS:  # x per group, (groups, group, m), read by both threads
            xg = scratch[0]["dq_x"].reshape(self.groups, self.group, m)
            np.copyto(xg, x.reshape(m, self.groups, self.group).transpose(1, 2, 0))
        mid = (self.rows + 1) // 2  # a half for each thread, when there is enough to share
        if len(scratch) > 1 and self.rows * self.cols >= BLOCK_ELEMENTS:
            HELPER.start(lambda: self._rows_product(x, xg, out, mid, self.rows, scratch[1]))
            self._rows_product(x, xg, out, 0, mid, scratch[0])
            HELPER.wait()
        else:
            self._rows_product(x, xg, out, 0, self.rows, scratch[0])
        if xg is not None and self.scaled_zero is not None:
            # the zero-point term: (m, groups) group sums of x times (out, groups) s * z
            out -= xg.sum(axis=1).T @ self.scaled_zero.T

    def _rows_product(self, x, xg, out, start: int, stop: int, bufs: dict) -> None:
        """Output columns ``start:stop``: per group with scales after the product (``xg``
        given, few input rows), or by dequantised blocks and one GEMM each."""
        groups, group = self.groups, self.group
        for r in range(start, stop, self.block_rows):
            n = min(stop, r + self.block_rows) - r
            f = bufs["dq"][: n * self.cols].reshape(n, self.cols)
            if xg is None:
                self.dequantize_rows(r, r + n, f, bufs["dq_n"])
                np.matmul(x, f.T, out=out[:, r : r + n])
                continue
            self.unpack(r, r + n, f, bufs["dq_n"])
            if groups == 1:  # one scale per row: scale the product
                block = out[:, r : r + n]
                np.matmul(x, f.T, out=block)
                block *= self.scale[r : r + n, 0]
                continue
            p = bufs["dq_p"][: groups * n * xg.shape[2]].reshape(groups, n, xg.shape[2])
            # per group: (n, group) x (group, m), the groups as a strided batch
            np.matmul(f.reshape(n, groups, group).transpose(1, 0, 2), xg, out=p)
            p *= self.scale[r : r + n].T[:, :, None]
            np.sum(p, axis=0, out=out[:, r : r + n].T)

    def matmul_transposed(
        self, dy: np.ndarray, out: np.ndarray, scratch: list[dict[str, np.ndarray]]
    ) -> None:
        """``out[m, i] = sum_o dy[m, o] W[o, i]`` (the input gradient of ``x . W^T``)."""
        out[...] = 0
        scratch = scratch[0]
        for r in range(0, self.rows, self.block_rows):
            stop = min(self.rows, r + self.block_rows)
            f = scratch["dq"][: (stop - r) * self.cols].reshape(stop - r, self.cols)
            self.dequantize_rows(r, stop, f, scratch["dq_n"])
            out += dy[:, r:stop] @ f
