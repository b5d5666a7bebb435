"""int4 products: the table-lookup kernel (AVX-512), where each nibble becomes its dequantised
weight in one permute, so a decode product costs a load, a shift, a permute and an FMA per 16
weights; and the choice of kernel per weight (q4_kernel) among it and numba_kernels.py's
portable ones.

For one output row and one group, the sixteen possible weights ``(u - z) * s`` (u = 0..15)
fit one 16-float vector: the *table*. ``vpermps`` looks up sixteen 32-bit lanes at once, each
by the low four bits of its index lane, so no mask is needed. Thirty-two packed bytes (a
*unit*: 64 weights) are read as sixteen 16-bit lanes, zero-extended to 32 bits; shifted right
by 0, 4, 8 and 12 bits they index the low nibble of the even bytes, the high nibble of the
even bytes, the low and the high nibble of the odd bytes. Each lookup multiplies the inputs
of its sixteen weights, read from a copy of x permuted once per call into that order, and the
sums stay in vector registers to the end of the row: no per-group horizontal sum, no float
weight written. The weights are the ones ``QuantizedMatrix.dequantize`` gives, bit for bit;
only the order of the additions differs from dequantise-then-matmul.

Layout (runtime/quantize.py): byte j of a row holds element j (low nibble) and j + in/2 (high
nibble); scales and zero points per (row, group). A unit's 32 low elements lie in one group
and its 32 high elements in one group when in/2 and the group are multiples of 32 and the
group a power of two (``fits``): every group size einplan stores. Other shapes, and machines
without AVX-512, keep numba_kernels.py's portable kernels.

Measured on SmolLM2-135M shapes (2 cores, Zen 4, one input row, group 64): 576x576 13 us
against 28 for the portable kernel, 1536x576 33 against 74, 576x1536 32 against 53, the
49152x576 tied head 0.69 ms against 1.54.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from llvmlite import binding, ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from einplan.runtime.backends.numba_kernels import (
    OPTIONS,
    q4_matmul_32,
    q4_matmul_64,
    q4_matmul_any,
)

UNIT = 32  # packed bytes per step of the loop: 64 weights, four lookups of 16
F32 = ir.FloatType()
I32 = ir.IntType(32)
I64 = ir.IntType(64)
VEC = ir.VectorType(F32, 16)
IVEC = ir.VectorType(I32, 16)
HALVES = ir.VectorType(ir.IntType(16), 16)
# the four lookups of a unit: (right shift of the 16-bit lane, low (0) or high (1) table)
LOOKUPS = ((0, 0), (4, 1), (8, 0), (12, 1))


@functools.cache
def has_avx512() -> bool:
    """True when numba compiles for this machine's CPU and it has AVX-512F (vpermps on 16
    lanes); a portable build (NUMBA_CPU_NAME set) or an older CPU takes the other kernels."""
    if os.environ.get("NUMBA_CPU_NAME"):
        return False
    return bool(binding.get_host_cpu_features().get("avx512f", False))


def fits(group: int, half: int) -> bool:
    """Whether the lookup kernel handles a weight with this group and packed width in/2."""
    return half % UNIT == 0 and group % UNIT == 0 and group & (group - 1) == 0


def broadcast(builder, value):
    """A 16-lane vector of one float."""
    v = builder.insert_element(ir.Constant(VEC, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(VEC, ir.Undefined), ir.Constant(IVEC, [0] * 16))


def sum_lanes(builder, v):
    """The sum of a vector's 16 lanes, as a tree of four shuffles and adds."""
    for width in (8, 4, 2, 1):
        order = [(i + width) % 16 if i < width else i for i in range(16)]
        v = builder.fadd(v, builder.shuffle_vector(v, v, ir.Constant(IVEC, order)))
    return builder.extract_element(v, ir.Constant(I32, 0))


def make_lookup_rows(rows: int):
    """An intrinsic summing one output row ``o`` for ``rows`` input rows from ``i0``: returns
    their dot products (a tuple of float32). ``xp``: the permuted inputs (m, in) (see
    permute_inputs); q (out, in/2) u8, scale and zero (out, groups) f32, all C-contiguous;
    ``log_group``: log2 of the group."""
    per_row = 4 if rows == 1 else 2  # independent sums per input row: FMA latency hidden

    @intrinsic
    def lookup_rows(typingctx, xp, q, scale, zero, log_group, o, i0):
        if not all(a.layout == "C" for a in (xp, q, scale, zero)):
            return None
        sig = types.UniTuple(types.float32, rows)(xp, q, scale, zero, log_group, o, i0)

        def codegen(context, builder, signature, args):
            xa, qa, sa, za = (
                context.make_array(t)(context, builder, a)
                for t, a in zip(signature.args[:4], args[:4], strict=True)
            )
            lg, ov, iv = (
                context.cast(builder, a, t, types.int64)
                for t, a in zip(signature.args[4:], args[4:], strict=True)
            )
            width = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
            half = cgutils.unpack_tuple(builder, qa.shape, 2)[1]
            groups = cgutils.unpack_tuple(builder, sa.shape, 2)[1]
            mod = builder.module
            fma = cgutils.get_or_insert_function(
                mod, ir.FunctionType(VEC, [VEC, VEC, VEC]), "llvm.fma.v16f32"
            )
            permute = cgutils.get_or_insert_function(
                mod, ir.FunctionType(VEC, [VEC, IVEC]), "llvm.x86.avx512.permvar.sf.512"
            )
            q_row = builder.gep(qa.data, [builder.mul(ov, half)])
            s_row = builder.gep(sa.data, [builder.mul(ov, groups)])
            z_row = builder.gep(za.data, [builder.mul(ov, groups)])
            x_rows = [
                builder.gep(xa.data, [builder.mul(builder.add(iv, ir.Constant(I64, r)), width)])
                for r in range(rows)
            ]
            zero_vec = ir.Constant(VEC, None)
            sums = [
                [cgutils.alloca_once_value(builder, zero_vec) for _ in range(per_row)]
                for _ in range(rows)
            ]
            tables = [cgutils.alloca_once_value(builder, zero_vec) for _ in range(2)]
            levels = ir.Constant(VEC, [float(u) for u in range(16)])
            mask = builder.sub(builder.shl(ir.Constant(I64, 1), lg), ir.Constant(I64, 1))
            zero64 = ir.Constant(I64, 0)

            def refresh(table, element, first):
                """Rebuild ``table`` when ``element`` starts a group (or on the first unit)."""
                starts = builder.icmp_unsigned("==", builder.and_(element, mask), zero64)
                with builder.if_then(builder.or_(starts, first)):
                    g = builder.lshr(element, lg)
                    s = builder.load(builder.gep(s_row, [g]))
                    z = builder.load(builder.gep(z_row, [g]))
                    w = builder.fsub(levels, broadcast(builder, z))
                    builder.store(builder.fmul(w, broadcast(builder, s)), table)

            units = builder.udiv(half, ir.Constant(I64, UNIT))
            with cgutils.for_range(builder, units) as loop:
                c = loop.index
                b0 = builder.mul(c, ir.Constant(I64, UNIT))
                first = builder.icmp_unsigned("==", c, zero64)
                refresh(tables[0], b0, first)
                refresh(tables[1], builder.add(b0, half), first)
                table = [builder.load(t) for t in tables]
                packed = builder.load(
                    builder.bitcast(builder.gep(q_row, [b0]), HALVES.as_pointer()), align=1
                )
                lanes = builder.zext(packed, IVEC)
                base = builder.mul(c, ir.Constant(I64, 2 * UNIT))
                for k, (shift, side) in enumerate(LOOKUPS):
                    by = ir.Constant(IVEC, [shift] * 16)
                    index = lanes if shift == 0 else builder.lshr(lanes, by)
                    w = builder.call(permute, [table[side], index])
                    at = builder.add(base, ir.Constant(I64, 16 * k))
                    for r in range(rows):
                        ptr = builder.bitcast(builder.gep(x_rows[r], [at]), VEC.as_pointer())
                        x = builder.load(ptr, align=4)
                        acc = sums[r][k % per_row]
                        builder.store(builder.call(fma, [x, w, builder.load(acc)]), acc)
            results = []
            for r in range(rows):
                total = builder.load(sums[r][0])
                for acc in sums[r][1:]:
                    total = builder.fadd(total, builder.load(acc))
                results.append(sum_lanes(builder, total))
            return context.make_tuple(builder, signature.return_type, results)

        return sig, codegen

    return lookup_rows


lookup_1 = make_lookup_rows(1)
lookup_2 = make_lookup_rows(2)
lookup_4 = make_lookup_rows(4)


@njit(**OPTIONS)
def permute_inputs(x, xp):  # pragma: no cover - compiled
    """Copy x (m, in) into xp (m, in) in the lookups' order: per unit of 32 bytes, the 16 even
    low elements, the 16 even high ones (+ in/2), the 16 odd low ones, the 16 odd high ones."""
    half = x.shape[1] // 2
    for i in range(x.shape[0]):
        for c in range(half // UNIT):
            for d in range(16):
                b = UNIT * c + 2 * d
                at = 2 * UNIT * c + d
                xp[i, at] = x[i, b]
                xp[i, at + 16] = x[i, b + half]
                xp[i, at + 32] = x[i, b + 1]
                xp[i, at + 48] = x[i, b + 1 + half]


@njit(parallel=True, **OPTIONS)
def q4_lut_matmul(x, q, scale, zero, group, out):  # pragma: no cover - compiled
    """``out[i, o] = sum_k x[i, k] W[o, k]`` of an int4 weight (see the module docstring),
    parallel over output rows, four input rows at a time."""
    m = x.shape[0]
    xp = np.empty((m, x.shape[1]), np.float32)
    permute_inputs(x, xp)
    log_group = 0
    while (1 << log_group) < group:
        log_group += 1
    for o in prange(q.shape[0]):
        i = 0
        while m - i >= 4:
            r4 = lookup_4(xp, q, scale, zero, log_group, o, i)
            for r in range(4):
                out[i + r, o] = r4[r]
            i += 4
        if m - i >= 2:
            r2 = lookup_2(xp, q, scale, zero, log_group, o, i)
            out[i, o] = r2[0]
            out[i + 1, o] = r2[1]
            i += 2
        if m - i == 1:
            out[i, o] = lookup_1(xp, q, scale, zero, log_group, o, i)[0]


def q4_kernel(group: int, half: int):
    """The int4 product for a group and packed width ``half`` (= in/2): the table-lookup
    kernel where the CPU and the shape allow it, else the portable one with the longest
    constant segment that fits."""
    if has_avx512() and fits(group, half):
        return q4_lut_matmul
    if group % 64 == 0 and half % 64 == 0:
        return q4_matmul_64
    return q4_matmul_32 if half % 32 == 0 else q4_matmul_any


def q4_matmul(x, q, scale, zero, group, out):
    """``x . W^T`` of an int4 weight into ``out`` (numba_kernels.py make_q4_matmul says
    what each kernel computes)."""
    q4_kernel(group, q.shape[1])(x, q, scale, zero, group, out)
