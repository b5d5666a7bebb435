"""Names of the state buffers and outputs the compiler makes and the runtime reads by key:
gradients ``grad.<param key>``, KV cache ``cache.<layer>.k``, optimizer state
``optim.<moment>.<param key>``."""

from __future__ import annotations

import re

GRAD_PREFIX = "grad."  # gradient outputs and their accumulators
CACHE_PREFIX = "cache."  # the KV cache
OPTIM_PREFIX = "optim."  # optimizer moments
STATE_PREFIXES = (GRAD_PREFIX, CACHE_PREFIX, OPTIM_PREFIX)  # every state leaf's key, no param's
LAYER = re.compile(r"^([A-Za-z_+]+)-(\d+)(?=\.|$)")  # a node name; packed: attn_q+attn_k+attn_v-3


def layer_of(name: str) -> int | None:
    """The layer number of a ``role-layer`` name (``attn_q-3.w`` -> 3); None outside layers."""
    m = LAYER.match(name)
    return int(m.group(2)) if m else None


def grad_key(key: str) -> str:
    """The name of the gradient of the parameter with checkpoint key ``key``."""
    return f"{GRAD_PREFIX}{key}"


def cache_key(layer: int, part: str) -> str:
    """The key of one layer's keys (``part`` "k") or values ("v") in the KV cache."""
    return f"{CACHE_PREFIX}{layer}.{part}"


def optim_key(moment: str, key: str) -> str:
    """The key of one optimizer moment (``m``, ``v``, ``buf``) of parameter ``key``."""
    return f"{OPTIM_PREFIX}{moment}.{key}"
