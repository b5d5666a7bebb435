"""Typed attributes the passes attach for later passes, the weights loader and the runtime:
what a quantised, LoRA or packed param is made of, an einsum's lowering recipe, and a step's
schedule. In memory they are these objects; compiler/plan.py alone turns them into the plan
file's JSON and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INPUT_ABSMAX = "input_absmax"  # the QuantPart of a static activation scale


@dataclass(frozen=True)
class QuantPart:
    """``attrs["quant"]`` of a param made by passes/quantize.py: one stored part (``q``,
    ``scale``, ``zero_point``) of a quantised weight, or a static activation scale
    (``input_absmax``, which has no group, symmetry or shape)."""

    part: str
    bits: int
    of: str  # checkpoint key of the float tensor the part stands for
    group: int | None = None
    symmetric: bool | None = None
    shape: tuple[int, int] | None = None  # (out, in) of the float weight


@dataclass(frozen=True)
class LoraPart:
    """``attrs["lora"]`` of a LoRA adapter param (passes/lora.py): its matrix (``A`` or ``B``)
    and the settings of the adapter it belongs to."""

    r: int
    alpha: float
    fan_in: int  # inputs of the projection: A's initialisation bound is 1/sqrt(fan_in)
    module: str  # the Hugging Face module, e.g. model.layers.3.self_attn.q_proj
    role: str  # the projection's role, e.g. attn_q
    part: str


@dataclass(frozen=True)
class PackMember:
    """One entry of ``attrs["pack"]`` (passes/pack.py): a checkpoint tensor making ``rows``
    rows of a packed param, and for a quantised part the float weight it stands for."""

    key: str
    rows: int
    of: str | None = None

    def __str__(self) -> str:
        """As the graph listing prints it: ``['key', rows]`` or ``['key', rows, 'of']``."""
        return str([self.key, self.rows] if self.of is None else [self.key, self.rows, self.of])


@dataclass(frozen=True)
class UnaryRecipe:
    """A one-operand einsum: sum away ``sum_axes``, then permute by ``perm``."""

    sum_axes: list[int]
    perm: list[int]


@dataclass(frozen=True)
class MatmulRecipe:
    """A two-operand einsum as one batched matmul: sum away axes only one operand has,
    permute A to (batch, a_free, contracted) and B to (batch, contracted, b_free), multiply,
    and permute the result by ``out_perm``; ``groups`` counts batch, a_free, contracted and
    b_free letters."""

    a_sum: list[int]
    b_sum: list[int]
    a_perm: list[int]
    b_perm: list[int]
    groups: list[int]
    out_perm: list[int]


def operand_copied(perm: list[int], nb: int, n1: int) -> bool:
    """Whether the runtime copies a matmul operand permuted by ``perm`` (``nb`` batch axes,
    ``n1`` in its first matrix group) into a scratch buffer: not when the permutation keeps the
    stored layout or is a plain (batched) 2-D transpose, which BLAS reads with its trans flag."""
    if perm == sorted(perm):
        return False
    c = len(perm) - nb - n1  # axes in the second matrix group
    swapped = list(range(nb)) + list(range(nb + c, len(perm))) + list(range(nb, nb + c))
    return perm != swapped


@dataclass(frozen=True)
class QMatmulRecipe:
    """``x . W^T`` (``dy . W`` when ``transposed``) with W dequantized block by block from
    its ``bits``-bit integers in groups of ``group`` (runtime/qmatmul.py)."""

    transposed: bool
    bits: int
    group: int


Recipe = UnaryRecipe | MatmulRecipe | QMatmulRecipe  # ``attrs["recipe"]`` of a lowered einsum


@dataclass(frozen=True)
class StepSchedule:
    """When and where a step runs: its dependency ``level`` and ``thread`` slot within it
    (passes/schedule.py), then its arena buffer and the values dead after it
    (passes/memory.py; ``free_after`` is None until that pass has run)."""

    level: int
    thread: int
    slot: int | None = None  # None: an output or a view, no buffer of the arena
    free_after: tuple[int, ...] | None = None


# What is wrong with a typed attr (None: nothing), for the op table's attr checks
# (compiler/ops.py), which Graph.verify runs on every node of a compiled or loaded graph.


def _is_int(v: object, least: int = 0) -> bool:
    return type(v) is int and v >= least


def quant_problem(q: object) -> str | None:
    if not isinstance(q, QuantPart):
        return "must be a quantised part"
    if q.part not in ("q", "scale", "zero_point", INPUT_ABSMAX) or q.bits not in (4, 8):
        return "names an unknown part or bit width"
    if type(q.of) is not str or type(q.bits) is not int:
        return "must name its float weight (of) and bits as an integer"
    if q.part == INPUT_ABSMAX:
        return None
    ok_shape = isinstance(q.shape, tuple) and len(q.shape) == 2
    if not (_is_int(q.group, 1) and type(q.symmetric) is bool and ok_shape):
        return "must have a positive group, symmetric true/false and a 2-D shape"
    if not all(_is_int(d, 1) for d in q.shape):
        return "must have a 2-D shape of positive sizes"
    return None


def lora_problem(lo: object) -> str | None:
    if not isinstance(lo, LoraPart):
        return "must be a LoRA part"
    if not (_is_int(lo.r, 1) and _is_int(lo.fan_in, 1)):
        return "must have a positive rank r and fan_in"
    if type(lo.alpha) not in (int, float) or not math.isfinite(lo.alpha):
        return "must have a finite alpha"
    if not all(type(v) is str for v in (lo.module, lo.role, lo.part)):
        return "must name its module, role and part as strings"
    return None


def pack_problem(pack: object) -> str | None:
    ok = isinstance(pack, tuple | list) and len(pack) > 0
    if not ok or not all(isinstance(m, PackMember) for m in pack):
        return "must be a non-empty list of [key, rows] or [key, rows, of]"
    for m in pack:
        if type(m.key) is not str or not _is_int(m.rows, 1):
            return "members must be [key, rows] with a positive number of rows"
        if m.of is not None and type(m.of) is not str:
            return "member's float weight (of) must be a string"
    return None


def recipe_problem(r: object) -> str | None:
    return None if isinstance(r, UnaryRecipe | MatmulRecipe | QMatmulRecipe) else "must be a recipe"
