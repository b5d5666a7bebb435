"""Replace each attention chain scores -> softmax -> context with one ``flash_attention`` op.

The chain the model traces (models/llama.py) is ``einsum[bsngh,btnh->bngst]`` (or ``bnth``
keys from the KV cache), ``softmax`` (causal, or with the additive mask) and
``einsum[bngst,btnh->bsngh]``; when the scores and probabilities feed nothing else, the three
nodes become one op whose kernel (runtime/flash.py) works in query blocks and key tiles with
an online softmax, skipping causal tiles above the diagonal, so no (queries x keys) matrix is
held. It runs before autodiff, so the reverse graph differentiates the op (compiler/vjp.py),
recomputing probabilities from the saved row log-sum-exp.

``ctx.attention``: ``plain`` keeps the chain; ``flash`` rewrites every entry, tiled at every
length; ``auto`` rewrites every entry but decode and lets the kernel run one untiled block
below :data:`MIN_TILED` keys. The choices are recorded in ``graph.meta["attention"]``.
"""

from __future__ import annotations

from einplan.compiler.ir import Graph, Node
from einplan.compiler.ops import Op
from einplan.compiler.pipeline import Mode, PassContext
from einplan.errors import EinplanError

ATTENTION_CHOICES = ("auto", "flash", "plain")

# Measured by `python benchmarks/attention.py --parts tiles` (benchmarks/results/flash_tiles.json,
# 2026-12-01 05:40 UTC, 2 shared vCPUs at load 15-16; flash_tiles_short.json for 16..128 keys,
# an earlier kernel on one thread): one SmolLM2-135M layer's attention (9 query heads, 3 KV
# heads, head dim 64, float32, batch 1), median ms:
#   keys           64   128    256   512   1024   2048   4096
#   plain        0.29  1.06   16.1  59.5    373   1117   2433
#   one block    0.29  0.97   12.2  28.2    145    440   1297
#   128 x 512                 12.1  24.8    140    459   1287
#   128 x 1024   0.29  0.94   12.1  31.4    142    452   1324
#   256 x 512                  9.5  26.2    167    456   1286
# Tile sizes differ by less than the noise from 2048 keys; 128 x 512 is best or within 2 % at
# every length from 512, and its tile (384 x 512 floats per KV head) is the smaller.
BLOCK_Q = 128  # query rows per block (x the 3 query heads of a KV head: 384 rows per product)
BLOCK_K = 512  # keys per tile
MIN_TILED = 512  # auto: below this many keys one block (as fast); from it tiles win (and the
# scores of one block would grow with the square of the length)
# decode (one query): the plain chain measured faster (benchmarks/attention.py --parts decode)
FLASH_DECODE = False

SCORE_SPECS = {"bsngh,btnh->bngst": "bsnh", "bsngh,bnth->bngst": "bnth"}
CONTEXT_SPECS = {"bsnh": "bngst,btnh->bsngh", "bnth": "bngst,bnth->bsngh"}


def check_attention(choice: str) -> str:
    """``choice`` when it names an attention implementation, else a clear error."""
    if choice not in ATTENTION_CHOICES:
        raise EinplanError(
            f"attention {choice!r} is not one of {', '.join(ATTENTION_CHOICES)} "
            "(auto: flash attention above a measured length, plain: the scores chain)"
        )
    return choice


def _chain(n: Node, nodes: dict[int, Node], uses: dict[int, list[int]]):
    """The (scores, softmax) nodes of the attention chain ending in context node ``n``, with
    the keys' layout; None when ``n`` does not end one or its parts feed other nodes."""
    if n.op is not Op.EINSUM or len(n.inputs) != 2:
        return None
    probs = nodes[n.inputs[0]]
    if probs.op is not Op.SOFTMAX or uses[probs.id] != [n.id]:
        return None
    scores = nodes[probs.inputs[0]]
    if scores.op is not Op.EINSUM or uses[scores.id] != [probs.id]:
        return None
    layout = SCORE_SPECS.get(scores.attrs.get("spec"))
    if layout is None or n.attrs.get("spec") != CONTEXT_SPECS[layout]:
        return None
    return scores, probs, layout


def flash_name(scores: Node) -> str:
    """``attn_scores-3`` -> ``attn_flash-3``."""
    role, dash, layer = scores.name.partition("-")
    return f"{role.replace('scores', 'flash')}{dash}{layer}"


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse every attention chain into a flash_attention node as ``ctx.attention`` says."""
    choice = check_attention(ctx.attention)
    decode = graph.name == "decode"
    if choice == "plain" or (choice == "auto" and decode and not FLASH_DECODE):
        why = "--attention plain" if choice == "plain" else "one query: plain measured faster"
        graph.meta["attention"] = {"kind": "plain", "why": why}
        return graph
    nodes, uses = graph.by_id(), graph.consumers()
    drop: set[int] = set()
    fused: dict[int, Node] = {}
    min_tiled = MIN_TILED if choice == "auto" else 0
    for n in graph.nodes:
        found = _chain(n, nodes, uses)
        if found is None:
            continue
        scores, probs, layout = found
        attrs = {"layout": layout, "causal": bool(probs.attrs.get("causal"))}
        if probs.attrs.get("scale", 1.0) != 1.0:
            attrs["scale"] = probs.attrs["scale"]
        attrs.update(block_q=BLOCK_Q, block_k=BLOCK_K, min_tiled=min_tiled)
        if ctx.mode is not Mode.INFERENCE:
            attrs["keep"] = True  # leave the row log-sum-exp for the reverse steps
        inputs = (*scores.inputs, n.inputs[1], *probs.inputs[1:])  # q, k, v[, mask]
        fused[n.id] = n.with_(
            op=Op.FLASH_ATTENTION, inputs=inputs, attrs=attrs, name=flash_name(scores)
        )
        drop |= {scores.id, probs.id}
    graph.meta["attention"] = {
        "kind": "flash" if fused else "plain",
        "why": ("--attention flash" if choice == "flash" else "auto: measured faster from 128 keys")
        if fused
        else "no attention chain found",
        "nodes": len(fused),
        "block_q": BLOCK_Q,
        "block_k": BLOCK_K,
        "min_tiled": min_tiled,
    }
    if not fused:
        return graph
    return graph.replace_nodes([fused.get(n.id, n) for n in graph.nodes if n.id not in drop])
