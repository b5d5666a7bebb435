"""Typed attributes the passes attach for later passes, the weights loader and the runtime:
what a quantised, LoRA or packed param is made of, an einsum's lowering recipe, and a step's
schedule. In memory they are these objects; compiler/plan.py alone turns them into the plan
file's JSON and back.
"""

from __future__ import annotations

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
