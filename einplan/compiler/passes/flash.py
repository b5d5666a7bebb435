"""Replace each attention chain scores -> softmax -> context with one ``flash_attention`` op.

The chain the model traces (models/llama.py) is ``einsum[bsngh,btnh->bngst]`` (or ``bnth``
keys from the KV cache), ``softmax`` (causal, or with the additive mask) and
``einsum[bngst,btnh->bsngh]``; when the scores and probabilities feed nothing else, the three
nodes become one op whose kernel (runtime/flash.py) works in query blocks and key tiles with
an online softmax, skipping causal tiles above the diagonal, so no (queries x keys) matrix is
held. It runs before autodiff, so the reverse graph differentiates the op (compiler/vjp.py),
recomputing probabilities from the saved row log-sum-exp.

``ctx.attention``: ``plain`` keeps the chain; ``flash`` rewrites every entry, tiled at every
length; ``auto`` rewrites every entry and lets the kernel run one untiled block below
:data:`MIN_TILED` keys. Either way an inference step of at most :data:`DIRECT_QUERIES`
queries (decode) attends directly, without tiles. The choices are recorded in
``graph.meta["attention"]``.
"""

from __future__ import annotations

from einplan.compiler.ir import Graph, Node
from einplan.compiler.ops import Op
from einplan.compiler.pipeline import Mode, PassContext
from einplan.errors import EinplanError

ATTENTION_CHOICES = ("auto", "flash", "plain")

# Measured by `python benchmarks/attention.py --parts tiles --tile-lengths 128,256,512,1024,4096`
# (benchmarks/results/flash_tiles.json, 2026-12-01 13:50 UTC, 2 vCPUs, the numba backend's
# compiled exp): one SmolLM2-135M layer's attention (9 query heads, 3 KV heads, head dim 64,
# float32, batch 1), median ms:
#   keys           128   256   512   1024    4096
#   plain          1.2   3.0   8.9   38.1   554.4
#   one block      1.2   1.9   5.0   14.2   174.7
#   128 x 512      1.1   1.7   4.7   13.1   184.1
#   128 x 1024           1.7   4.6   12.5   190.7
#   256 x 512            2.1   4.7   13.9   177.5
#   256 x 2048           2.1   4.7   13.8   171.1
# Tile sizes differ by less than the noise from 512 keys; 128 x 512 is best or within 8 % at
# every length, and its tile (384 x 512 floats per job) stays in a core's L2 cache. From 256
# keys tiles beat one block (a causal plan then has two query blocks per KV head, jobs enough
# for both threads); below, a causal 128-query block is the whole sequence anyway.
BLOCK_Q = 128  # query rows per block (x the 3 query heads of a KV head: 384 rows per product)
BLOCK_K = 512  # keys per tile
MIN_TILED = 256  # auto: below this many keys one block (as fast); from it tiles win (and the
# scores of one block would grow with the square of the length)
# a step with fewer score entries runs its jobs on one thread: a 32-token prefill's (9 x 32 x 32)
# took 154 us on one against 247 on two, 64 tokens 263 against 362, 128 tokens 723 against 573
# (median of 200, one SmolLM2-135M layer, 2 cores)
TWO_WORKERS_FROM = 1 << 16
# an inference step with at most this many queries, a literal of the traced shape (decode: 1),
# attends directly: all its scores at once, no tiles and no heads-first copy of the cache
# (runtime/kernels.py make_direct_attention). Measured by `python benchmarks/attention.py --parts
# decode --kernels numpy|numba` (one SmolLM2-135M layer, one query, 2 cores, 2026-12-01), median
# us, direct against the plain chain: numpy 49/49 at 128 keys, 57/57 at 256, 113/202 at 1024,
# 345/691 at 4096; numba 39/40, 55/53, 117/205, 384/741. The tiled kernel took 384 against 89
# at 256 keys: it copies the whole cache heads-first.
DIRECT_QUERIES = 16

FULL_PRECISION = ("f32", "f64")  # dtypes a direct step multiplies in (16-bit ones: tiles)


def key_axis(n: Node) -> int:
    """The keys' axis of a flash step's k and v: (b, n, t, h) from a KV cache, else (b, t, n, h)."""
    return 2 if n.attrs["layout"] == "bnth" else 1


def attends_directly(n: Node, sizes: tuple[int, ...], keys: int) -> bool:
    """Whether a flash step runs as one direct step (all scores at once) at these bound sizes
    (``sizes``: q's (b, s, n, g, h)): marked ``direct`` (decode), or an inference step in
    float32/64 whose scores take no more memory than the tiled kernel's heads-first copies of
    q, k and v (a prompt of up to about 100 tokens), so the plan's memory estimate holds either
    way. One SmolLM2-135M layer, 2 cores, causal with a padding mask, tiled against direct
    (us, numba): 27 queries over 31 keys 252 / 84, 32 over 64 295 / 149, 64 over 64 326 / 257;
    (the tiled kernel's job set-up and copies dominate at these sizes)."""
    if n.attrs.get("direct"):
        return True
    if n.op is not Op.FLASH_ATTENTION or n.attrs.get("keep") or n.dtype not in FULL_PRECISION:
        return False
    _, s, _, g, h = sizes
    return g * s * keys <= (h + 1) * (g * s + 2 * keys)


Tile = tuple[int, int, bool]  # first key, end key, whether it is the causal diagonal tile
Block = tuple[int, int, list[Tile]]  # first row, end row, its key tiles


def plan_tiles(
    queries: int, keys: int, causal: bool, block_q: int, block_k: int, min_tiled: int
) -> list[Block]:
    """The query blocks and, for each, the key tiles it computes: causal blocks start with the
    diagonal tile (the keys at the block's own positions, queries sitting at the end of the
    keys), then the keys before it; fewer than ``min_tiled`` keys make one block."""
    if keys < min_tiled:
        block_q, block_k = queries, keys
    off = keys - queries
    blocks = []
    for i0 in range(0, queries, block_q):
        i1 = min(queries, i0 + block_q)
        if causal:
            d0, d1 = max(0, i0 + off), min(keys, i1 + off)
            tiles = [(d0, d1, True)]
        else:
            d0, tiles = keys, []
        tiles += [(j0, min(d0, j0 + block_k), False) for j0 in range(0, d0, block_k)]
        blocks.append((i0, i1, tiles))
    return blocks


def block_entries(block: Block) -> int:
    """Score entries a query block computes per query head: its rows times its tiles' keys."""
    i0, i1, tiles = block
    return (i1 - i0) * sum(j1 - j0 for j0, j1, _ in tiles)


def flash_workers(blocks: list[Block], jobs_per_block: int, g: int, threads: int) -> int:
    """Threads that share a step's jobs (``jobs_per_block``: batch rows x KV heads): one below
    TWO_WORKERS_FROM score entries, where handing half to a helper thread costs more than it
    saves, else ``threads``, at most one per job."""
    if jobs_per_block * g * sum(map(block_entries, blocks)) < TWO_WORKERS_FROM:
        return 1
    return max(1, min(threads, jobs_per_block * len(blocks)))


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
    if choice == "plain":
        graph.meta["attention"] = {"kind": "plain", "why": "--attention plain"}
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
        elif n.dtype in FULL_PRECISION and isinstance(n.shape[1], int):
            if n.shape[1] <= DIRECT_QUERIES:
                attrs["direct"] = True
        inputs = (*scores.inputs, n.inputs[1], *probs.inputs[1:])  # q, k, v[, mask]
        fused[n.id] = n.with_(
            op=Op.FLASH_ATTENTION, inputs=inputs, attrs=attrs, name=flash_name(scores)
        )
        drop |= {scores.id, probs.id}
    direct = sum(bool(n.attrs.get("direct")) for n in fused.values())
    chosen = "--attention flash" if choice == "flash" else "auto"
    why = chosen if choice == "flash" else "auto: measured faster from 128 keys"
    if direct:  # decode: as fast as the plain chain to 256 keys, 2x at 4096
        why = f"{chosen}: at most {DIRECT_QUERIES} queries, all keys at once"
    elif ctx.mode is Mode.INFERENCE and any(n.dtype in FULL_PRECISION for n in fused.values()):
        why += "; a short prompt attends directly (scores no larger than the tiles' copies)"
    graph.meta["attention"] = {
        "kind": "flash" if fused else "plain",
        "why": why if fused else "no attention chain found",
        "nodes": len(fused),
        "direct": direct,
        "block_q": BLOCK_Q,
        "block_k": BLOCK_K,
        "min_tiled": min_tiled,
    }
    if not fused:
        return graph
    return graph.replace_nodes([fused.get(n.id, n) for n in graph.nodes if n.id not in drop])
