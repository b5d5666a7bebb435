"""Compiled products with a weight held as panels (runtime/panels.py): ``out = x . W`` for x
(m, in) and W (in, out) stored as (out/32, in, 32).

The work is cut into *tiles*: ``rows`` input rows times ``panels`` adjacent panels. A tile
walks the input dimension once; at each step it loads the 32 weights of each of its panels
(two 16-float vectors), broadcasts each row's input value and adds the products into
``rows x panels x 2`` vector sums that stay in registers to the end, where they are stored
as the tile's outputs: no partial sums in memory, no reduction across threads.

- Prompt and forward products (m > 1) take tiles of 8 rows x 1 panel (16 sums, then 4, 2 and
  1 rows for the rest), parallel over panels. Rows go in blocks of ``ROW_BLOCK`` (fewer for
  wide rows: at most ``BLOCK_BYTES`` of x) so a block of x stays in each core's L2 while the
  panels stream past it; each panel is read once per block, front to back, while the tiles
  of that block reuse it from L1/L2.
- A decode product (m = 1) takes tiles of 1 row x 4 panels: four streams 128 x in bytes
  apart keep more reads in flight than one (the lesson of numba_decode.f32_gemv). Each thread
  takes an equal run of panels (SmolLM2's 18-panel products would split 3:2 by tiles).

Tiles with fewer than 8 sums split the input dimension into interleaved chains (``chains``)
so that enough FMAs are independent to hide their latency; the chains are added at the end.
Written as LLVM IR through a numba ``@intrinsic`` (as numba_int4.py): the sums must be
registers, and numba's loops over 2-D arrays did not vectorise into this form.

Measured against OpenBLAS (numpy's matmul on the row-major weight), 2 cores Zen 4, SmolLM2's
four product shapes, each weight read from memory (not cache) per call: 32 rows 176-195
GFLOP/s against 97-115; 8 rows 75-124 against 33-46 (and f32_gemv's 33-52); 256 and 1024 rows
201-215 against 167-198; one row 28-32 GB/s, as f32_gemv. (scratch measurements, one run;
benchmarks/generate.py measures the end to end.)
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from einplan.runtime.backends.numba_int4 import F32, I64, broadcast
from einplan.runtime.backends.numba_kernels import OPTIONS
from einplan.runtime.panels import PANEL

VEC = ir.VectorType(F32, 16)
HALVES = PANEL // 16  # vectors per panel row
ROW_BLOCK = 128  # rows of x per block (at most): they stay in L2 while the panels stream
BLOCK_BYTES = 1 << 20  # ... and their floats at most this many bytes (wide inputs: fewer rows)


def make_tile(rows: int, panels: int):
    """An intrinsic ``tile(x, w, out, i0, p0, c0, k0, k_len)``: ``out[i0:i0+rows, 32 c0 :
    32 (c0+panels)] = x[i0:i0+rows, :k_len] . W[k0:k0+k_len, 32 p0 : 32 (p0+panels)]`` for
    the panels ``w`` (n, in, 32) of W; x (m, >= k_len) and out (m, >= 32 (c0+panels)),
    all C-contiguous. A product passes c0 = p0, k0 = 0, k_len = in; flash attention's tiles
    (numba_flash.py) take a run of keys."""
    chains = max(1, 4 // (rows * panels))  # at least 8 independent sums in flight

    @intrinsic
    def tile(typingctx, x, w, out, i0, p0, c0, k0, k_len):
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in (x, w, out)):
            return None
        sig = types.void(x, w, out, i0, p0, c0, k0, k_len)

        def codegen(context, builder, signature, args):
            xa, wa, oa = (
                context.make_array(t)(context, builder, a)
                for t, a in zip(signature.args[:3], args[:3], strict=True)
            )
            iv, pv, cv, k0v, k_in = (
                context.cast(builder, a, t, types.int64)
                for t, a in zip(signature.args[3:], args[3:], strict=True)
            )

            def const(v):
                return ir.Constant(I64, v)

            x_width = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
            w_rows = cgutils.unpack_tuple(builder, wa.shape, 3)[1]
            n_out = cgutils.unpack_tuple(builder, oa.shape, 2)[1]
            x_rows = [
                builder.gep(xa.data, [builder.mul(builder.add(iv, const(r)), x_width)])
                for r in range(rows)
            ]
            panel_size = builder.mul(w_rows, const(PANEL))
            start = builder.mul(k0v, const(PANEL))
            w_panels = [
                builder.gep(
                    wa.data,
                    [builder.add(builder.mul(builder.add(pv, const(q)), panel_size), start)],
                )
                for q in range(panels)
            ]
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(VEC, [VEC, VEC, VEC]), "llvm.fma.v16f32"
            )
            zero = ir.Constant(VEC, None)
            sums = {
                (h, r, q, j): cgutils.alloca_once_value(builder, zero)
                for h in range(chains)
                for r in range(rows)
                for q in range(panels)
                for j in range(HALVES)
            }

            def step(k, h):
                """Add input element k of every row times panel row k into chain h."""
                at = builder.mul(k, const(PANEL))
                ws = [
                    [
                        builder.load(
                            builder.bitcast(
                                builder.gep(w_panels[q], [builder.add(at, const(16 * j))]),
                                VEC.as_pointer(),
                            ),
                            align=4,
                        )
                        for j in range(HALVES)
                    ]
                    for q in range(panels)
                ]
                for r in range(rows):
                    xb = broadcast(builder, builder.load(builder.gep(x_rows[r], [k])))
                    for q in range(panels):
                        for j in range(HALVES):
                            acc = sums[(h, r, q, j)]
                            builder.store(builder.call(fma, [xb, ws[q][j], builder.load(acc)]), acc)

            rounds = builder.udiv(k_in, const(chains))
            with cgutils.for_range(builder, rounds) as loop:
                base = builder.mul(loop.index, const(chains))
                for h in range(chains):
                    step(builder.add(base, const(h)), h)
            done = builder.mul(rounds, const(chains))
            with cgutils.for_range(builder, builder.sub(k_in, done)) as loop:
                step(builder.add(done, loop.index), 0)
            for r in range(rows):
                out_row = builder.gep(oa.data, [builder.mul(builder.add(iv, const(r)), n_out)])
                for q in range(panels):
                    col = builder.mul(builder.add(cv, const(q)), const(PANEL))
                    for j in range(HALVES):
                        total = builder.load(sums[(0, r, q, j)])
                        for h in range(1, chains):
                            total = builder.fadd(total, builder.load(sums[(h, r, q, j)]))
                        ptr = builder.gep(out_row, [builder.add(col, const(16 * j))])
                        builder.store(total, builder.bitcast(ptr, VEC.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


tile_8 = make_tile(8, 1)
tile_4 = make_tile(4, 1)
tile_2 = make_tile(2, 1)
tile_1 = make_tile(1, 1)
tile_1x4 = make_tile(1, 4)


@njit(**OPTIONS)
def panel_rows(x, w, out, i0, i1, p, c):  # pragma: no cover - compiled
    """Rows i0:i1 of panel p into output column block c: tiles of 8 rows, then one of 4, 2
    and 1 for the rest."""
    k = x.shape[1]
    i = i0
    while i1 - i >= 8:
        tile_8(x, w, out, i, p, c, 0, k)
        i += 8
    if i1 - i >= 4:
        tile_4(x, w, out, i, p, c, 0, k)
        i += 4
    if i1 - i >= 2:
        tile_2(x, w, out, i, p, c, 0, k)
        i += 2
    if i1 - i == 1:
        tile_1(x, w, out, i, p, c, 0, k)


@njit(parallel=True, **OPTIONS)
def panel_matmul(x, w, out, threads):  # pragma: no cover - compiled
    """``out = x . W``: x (m, in), W as panels w (n, in, 32), out (m, 32 n); all C-contiguous
    float32 (see the module docstring for the tiles); ``threads``: numba's thread count (an
    argument: a kernel that reads it is not cached)."""
    m = x.shape[0]
    n = w.shape[0]
    if m == 1:  # each thread an equal run of panels, four at a time
        per = (n + threads - 1) // threads
        for t in prange(threads):
            p, end = min(n, t * per), min(n, (t + 1) * per)
            while end - p >= 4:
                tile_1x4(x, w, out, 0, p, p, 0, x.shape[1])
                p += 4
            while p < end:
                tile_1(x, w, out, 0, p, p, 0, x.shape[1])
                p += 1
        return
    block = max(8, min(ROW_BLOCK, BLOCK_BYTES // (4 * x.shape[1]) // 8 * 8))
    for i0 in range(0, m, block):
        i1 = min(m, i0 + block)
        for p in prange(n):
            panel_rows(x, w, out, i0, i1, p, p)


def warm_up() -> None:
    """Call the kernel once per path on tiny arrays (compile, or load from the disk cache)."""
    w = np.ones((1, 8, PANEL), np.float32)
    for m in (1, 2):
        panel_matmul(np.ones((m, 8), np.float32), w, np.empty((m, PANEL), np.float32), 2)
