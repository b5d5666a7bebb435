"""Where a node sits in the model, read off its ``role-layer`` name and tags: its layer, its
role, its phase in the seed einsum-transformer's vocabulary, and its training stage.

One table (:data:`PHASES`) maps roles to phases, so every report groups nodes the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from einplan.compiler.ir import training_phase
from einplan.compiler.names import LAYER

QKV = "Attention: QKV projection"
ROPE = "Attention: RoPE"
SCORES = "Attention: scores/softmax"
FLASH = "Attention: flash (scores, softmax, context)"  # the three fused (passes/flash.py)
AGGREGATE = "Attention: output aggregation and projection"

# role (the name without its layer number) -> phase; a role with suffixes (attn_q.rope.grad0)
# is looked up by its longest known prefix (attn_q.rope); a packed projection
# (attn_q+attn_k+attn_v) by its first part. Residual adds belong to their block, KV-cache
# writes to the projection.
PHASES = {
    "embed": "Embedding",
    "attn_norm": "Norm",
    "ffn_norm": "Norm",
    "output_norm": "Norm",
    "attn_q": QKV,
    "attn_k": QKV,
    "attn_v": QKV,
    "attn_k.cache": QKV,
    "attn_v.cache": QKV,
    "rope_table": ROPE,
    "attn_q.rope": ROPE,
    "attn_k.rope": ROPE,
    "attn_scores": SCORES,
    "attn_softmax": SCORES,
    "attn_flash": FLASH,
    "attn_ctx": AGGREGATE,
    "attn_o": AGGREGATE,
    "attn_residual": AGGREGATE,
    "ffn_gate": "FFN",
    "ffn_up": "FFN",
    "ffn_act": "FFN",
    "ffn_down": "FFN",
    "ffn_residual": "FFN",
    "output": "Output head",
    "last": "Output head",
    "loss": "Loss",
}
PHASE_ORDER = [
    "Embedding",
    "Norm",
    QKV,
    ROPE,
    SCORES,
    FLASH,
    AGGREGATE,
    "FFN",
    "Output head",
    "Loss",
    "Other",
]
STAGES = ["Forward", "Backward", "Optimizer"]


def role_of(name: str) -> str:
    """The name without its layer number (``attn_q-3.rope`` -> ``attn_q.rope``)."""
    return LAYER.sub(r"\1", name, count=1)


def stage_of(tags: Iterable[str]) -> str:
    """Forward, Backward (nodes the autodiff pass tags ``reverse``) or Optimizer."""
    return training_phase(tags).capitalize()


def phase_of(name: str, tags: Iterable[str] = ()) -> str:
    """The phase of a node (``attn_q-3`` -> ``Attention: QKV projection``), prefixed with its
    stage when it is not a forward node (``Backward / FFN``)."""
    role = role_of(name)
    parts = role.split(".")
    parts[0] = parts[0].split("+")[0]
    prefixes = (".".join(parts[:k]) for k in range(len(parts), 0, -1))
    phase = next((PHASES[p] for p in prefixes if p in PHASES), "Other")
    stage = stage_of(tags)
    if stage == "Optimizer":
        return stage
    return phase if stage == "Forward" else f"{stage} / {phase}"


def phase_rank(phase: str) -> tuple[int, int]:
    """Sort key putting phases in model order, forward stage first."""
    stage, _, base = phase.rpartition(" / ")
    stage = stage or ("Optimizer" if base == "Optimizer" else "Forward")
    order = PHASE_ORDER.index(base) if base in PHASE_ORDER else len(PHASE_ORDER)
    return STAGES.index(stage) if stage in STAGES else len(STAGES), order
