"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2), traced into einsum nodes.

One readable file in the spirit of nanoGPT: every contraction is an einsum with
its shape comment, every projection goes through :func:`linear`, and node
names follow ``role-layer`` (``attn_q-3``) so graphs and reports speak the
model's language. Weights keep Hugging Face's names and (out, in) layout.

Dims: b batch, s (query) sequence, t key sequence, d hidden, n KV heads,
g query heads per KV head, h head dim, f MLP width, v vocabulary, E experts (MoE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from einplan.compiler.dtypes import LOW_PRECISION, master_dtype
from einplan.compiler.ir import Graph
from einplan.compiler.names import cache_key
from einplan.compiler.tags import Tag
from einplan.compiler.trace import Builder, Value
from einplan.models.config import ModelConfig

LINEAR = frozenset({Tag.LINEAR})


def rope_inv_freq(cfg: ModelConfig, dtype: str = "f32") -> list[float]:
    """Rotary inverse frequencies in ``dtype`` (float32 as transformers computes them, or
    float64), with Llama-3 or linear scaling applied."""
    hd = cfg.head_dim
    ft = np.float64 if dtype == "f64" else np.float32
    inv = (1.0 / (ft(cfg.rope_theta) ** (np.arange(0, hd, 2, dtype=ft) / hd))).astype(ft)
    sc = cfg.rope_scaling
    if sc.get("rope_type") == "linear":
        inv = inv / np.float32(sc["factor"])
    elif sc.get("rope_type") == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv = np.where(medium, smoothed, scaled).astype(ft)
    return [float(x) for x in inv]


ENTRIES = ("forward", "prefill", "decode")
# loss: forward + mean next-token cross entropy against targets; verify: prefill with the
# logits of every position (speculative decoding checks k drafted tokens in one step),
# compiled on request: entries=(*ENTRIES, "verify")
TRACED = (*ENTRIES, "verify", "loss")


@dataclass(frozen=True)
class Step:
    """What one traced entry point needs besides the builder: the config, the weight and
    compute dtypes, and for cached entries the attention mask (batch, seq, kv) and the cache
    write slot."""

    cfg: ModelConfig
    weight_dtype: str = "f32"
    mask: Value | None = None
    write_pos: Value | None = None


def dim_limits(max_batch: int, max_positions: int) -> dict[str, int]:
    """The largest size of each symbolic dim an entry can declare: ``batch`` the config's
    max_batch, ``seq`` (tokens), ``kv`` (keys attended) and ``ctx`` (cache length) its
    max_position_embeddings."""
    return {"batch": max_batch, "seq": max_positions, "kv": max_positions, "ctx": max_positions}


def linear(
    b: Builder, x: Value, role: str, key: str, n_out: int, bias: bool = False, dtype: str = "f32"
) -> Value:
    """Project the last axis of ``x`` by the (out, in) weight ``key`` stored as ``dtype``
    (cast to x's compute dtype); the one choke point where LoRA and quantisation rewrite the
    graph."""
    w = b.param(f"{role}.w", f"{key}.weight", (n_out, x.shape[-1]), dtype, tags=LINEAR)
    if dtype != x.dtype:
        w = b.cast(w, x.dtype, role=f"{role}.cast")
    lead = "bs"[: len(x.shape) - 1]
    # (batch, seq, in) x (out, in) -> (batch, seq, out)
    y = b.einsum(f"{lead}i,oi->{lead}o", x, w, role=role, tags=LINEAR)
    if bias:
        bias_w = b.param(f"{role}.b", f"{key}.bias", (n_out,), master_dtype(x.dtype))
        if bias_w.dtype != x.dtype:
            bias_w = b.cast(bias_w, x.dtype, role=f"{role}.b.cast")
        y = b.add(y, bias_w, role=f"{role}.bias")
    return y


def attention(b: Builder, x: Value, rope: Value, st: Step, i: int) -> Value:
    """Causal self-attention with grouped KV heads (MHA when g = 1, MQA when n = 1); with a
    KV cache when the step has a mask (prefill, decode)."""
    cfg, wdt = st.cfg, st.weight_dtype
    n, hd = cfg.num_key_value_heads, cfg.head_dim
    g = cfg.num_attention_heads // n
    pre = f"model.layers.{i}.self_attn"
    bias = cfg.qkv_bias
    q = linear(b, x, "attn_q", f"{pre}.q_proj", n * g * hd, bias, wdt)
    k = linear(b, x, "attn_k", f"{pre}.k_proj", n * hd, bias, wdt)
    v = linear(b, x, "attn_v", f"{pre}.v_proj", n * hd, bias, wdt)
    bs, s = x.shape[0], x.shape[1]
    # 1/sqrt(head_dim) is applied to q (s x h values) rather than to the scores (s x t)
    q = b.reshape(q, (bs, s, n, g, hd), role="attn_q.heads")
    q = b.rope(q, rope, scale=1.0 / math.sqrt(hd), role="attn_q.rope")
    k = b.rope(b.reshape(k, (bs, s, n, hd), role="attn_k.heads"), rope, role="attn_k.rope")
    v = b.reshape(v, (bs, s, n, hd), role="attn_v.heads")
    if st.mask is None:
        # (b, s, n, g, h) x (b, t, n, h) -> (b, n, g, s, t)
        scores = b.einsum("bsngh,btnh->bngst", q, k, role="attn_scores")
        probs = b.softmax(scores, causal=True, role="attn_softmax")
        # (b, n, g, s, t) x (b, t, n, h) -> (b, s, n, g, h)
        ctx = b.einsum("bngst,btnh->bsngh", probs, v, role="attn_ctx")
    else:  # write into the cache (head-major, so attention reads it without a copy) ...
        shape, pos = (bs, n, "ctx", hd), st.write_pos
        k_cache = b.state("k_cache", cache_key(i, "k"), shape, k.dtype)
        v_cache = b.state("v_cache", cache_key(i, "v"), shape, v.dtype)
        k = b.kv_append(k_cache, k, pos, "kv", "attn_k.cache")
        v = b.kv_append(v_cache, v, pos, "kv", "attn_v.cache")
        # ... and attend over its first kv slots: (b, s, n, g, h) x (b, n, t, h) -> (b, n, g, s, t)
        scores = b.einsum("bsngh,bnth->bngst", q, k, role="attn_scores")
        # the mask holds causality, padding and slots not written yet
        probs = b.softmax(scores, mask=st.mask, role="attn_softmax")
        # (b, n, g, s, t) x (b, n, t, h) -> (b, s, n, g, h)
        ctx = b.einsum("bngst,bnth->bsngh", probs, v, role="attn_ctx")
    ctx = b.reshape(ctx, (bs, s, n * g * hd), role="attn_ctx.merge")
    return linear(b, ctx, "attn_o", f"{pre}.o_proj", cfg.hidden_size, False, wdt)


def mlp(b: Builder, x: Value, st: Step, i: int) -> Value:
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
    cfg, wdt = st.cfg, st.weight_dtype
    pre = f"model.layers.{i}.mlp"
    gate = linear(b, x, "ffn_gate", f"{pre}.gate_proj", cfg.intermediate_size, False, wdt)
    up = linear(b, x, "ffn_up", f"{pre}.up_proj", cfg.intermediate_size, False, wdt)
    act = b.silu_mul(gate, up, role="ffn_act")
    return linear(b, act, "ffn_down", f"{pre}.down_proj", cfg.hidden_size, False, wdt)


EXPERT_WEIGHTS = {  # checkpoint names of an expert's gate, up and down projections
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
}


def moe_prefix(cfg: ModelConfig, i: int) -> str:
    """The checkpoint prefix of layer ``i``'s sparse MoE block."""
    block = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
    return f"model.layers.{i}.{block}"


def expert_param(
    b: Builder, role: str, key: str, shape: tuple[int, int], wdt: str, cdt: str
) -> Value:
    w = b.param(f"{role}.w", f"{key}.weight", shape, wdt)
    return w if wdt == cdt else b.cast(w, cdt, role=f"{role}.cast")


def moe(b: Builder, x: Value, st: Step, i: int) -> tuple[Value, Value]:
    """Sparse mixture of experts: a router picks the top-k of E SwiGLU experts per token, each
    expert computes only the tokens routed to it, and their outputs are summed weighted by the
    routing weights (plus Qwen2-MoE's sigmoid-gated shared expert). Returns the block's output
    and the router probabilities (for the load-balancing loss)."""
    cfg, wdt = st.cfg, st.weight_dtype
    n_exp, k, d = cfg.num_experts, cfg.num_experts_per_tok, x.shape[-1]
    f = cfg.moe_intermediate_size
    pre = moe_prefix(cfg, i)
    # (b, s, d) x (E, d) -> (b, s, E)
    logits = linear(b, x, "moe_router", f"{pre}.gate", n_exp, False, wdt)
    probs = b.softmax(logits, role="moe_probs")  # over all E experts
    gates = b.moe_topk(probs, k, cfg.norm_topk_prob, role="moe_topk")  # (b, s, E), k non-zero
    names = EXPERT_WEIGHTS[cfg.model_type]
    y = None
    for e in range(n_exp):
        role, key = f"moe_expert.{e}", f"{pre}.experts.{e}"
        wg = expert_param(b, f"{role}.gate", f"{key}.{names[0]}", (f, d), wdt, x.dtype)
        wu = expert_param(b, f"{role}.up", f"{key}.{names[1]}", (f, d), wdt, x.dtype)
        wd = expert_param(b, f"{role}.down", f"{key}.{names[2]}", (d, f), wdt, x.dtype)
        # gates[..., e] * down(silu(gate(x)) * up(x)) on the tokens routed to e, else 0
        ye = b.moe_expert(x, gates, wg, wu, wd, e, k, role=role)  # (b, s, d)
        y = ye if y is None else b.add(y, ye, role=f"moe_combine.{e}")
    assert y is not None
    if cfg.shared_expert_intermediate_size:
        fs, key = cfg.shared_expert_intermediate_size, f"{pre}.shared_expert"
        gate = linear(b, x, "moe_shared_gate", f"{key}.gate_proj", fs, False, wdt)
        up = linear(b, x, "moe_shared_up", f"{key}.up_proj", fs, False, wdt)
        act = b.silu_mul(gate, up, role="moe_shared_act")
        shared = linear(b, act, "moe_shared_down", f"{key}.down_proj", d, False, wdt)
        # (b, s, d) x (1, d) -> (b, s, 1): how much of the shared expert each token takes
        weight = linear(b, x, "moe_shared_router", f"{pre}.shared_expert_gate", 1, False, wdt)
        shared = b.mul(shared, b.sigmoid(weight, role="moe_shared_router.sigmoid"), "moe_shared")
        y = b.add(y, shared, role="moe_combine.shared")
    return y, probs


def norm_weight(b: Builder, role: str, key: str, d: int, cdt: str) -> Value:
    """An RMS norm's (d,) weight, stored in the master dtype and cast to ``cdt`` if it differs."""
    w = b.param(f"{role}.w", key, (d,), master_dtype(cdt))
    return w if w.dtype == cdt else b.cast(w, cdt, role=f"{role}.cast")


def build_graph(
    cfg: ModelConfig, entry: str = "forward", weight_dtype: str = "f32", compute_dtype: str = "f32"
) -> Graph:
    """Trace one entry point: token ids and positions in, logits (or the loss) out, computed
    in ``compute_dtype`` (float32, float64 for gradient checks, or bf16/f16 storage with
    float32 master weights: mixed precision).

    ``forward``: logits for every position, no cache. ``prefill``: ``seq`` prompt tokens
    written into the KV cache at slot ``write_pos``, attending over its first ``kv`` slots as
    the additive ``mask`` (batch, seq, kv) allows; logits of the last position. ``decode``: the
    same for one token per sequence, so its shapes stay fixed from token to token.
    ``verify``: prefill with the logits of every position (speculative decoding). ``loss``:
    the forward pass scored against ``targets`` (batch, seq) by mean cross entropy (targets
    of -100 are ignored), the graph the autodiff pass differentiates.
    """
    if entry not in TRACED:
        raise ValueError(f"unknown entry point {entry!r} (known: {', '.join(TRACED)})")
    limits = dim_limits(cfg.max_batch, cfg.max_position_embeddings)
    cached = entry in ("prefill", "decode", "verify")
    dims = {k: v for k, v in limits.items() if cached or k in ("batch", "seq")}
    b = Builder(dims, entry)
    seq = 1 if entry == "decode" else "seq"
    d, cdt = cfg.hidden_size, compute_dtype
    # mixed precision (bf16, f16): float32 master weights cast to cdt where read, rope angles
    # in float32; otherwise norms and rope in the compute dtype
    mdt = master_dtype(cdt)
    tokens = b.input("tokens", ("batch", seq), "i64")
    positions = b.input("positions", ("batch", seq), "i64")
    st = Step(cfg, weight_dtype)
    if cached:
        mask = b.input("mask", ("batch", seq, "kv"), cdt)
        st = Step(cfg, weight_dtype, mask, b.input("write_pos", (1,), "i64"))
    if entry == "decode":
        del b.graph.dims["seq"]
    embed = b.param("embed.w", "model.embed_tokens.weight", (cfg.vocab_size, d), weight_dtype)
    if (
        cdt in LOW_PRECISION and weight_dtype != cdt
    ):  # one cdt copy of the table, so its gradient is a cdt scatter
        embed = b.cast(embed, cdt, role="embed.cast")
    x = b.gather(embed, tokens, cdt, role="embed")  # (b, s) -> (b, s, d)
    rope = b.rope_table(positions, rope_inv_freq(cfg, mdt), mdt)
    router_probs: list[Value] = []
    for i in range(cfg.num_hidden_layers):
        with b.layer(i):
            key = f"model.layers.{i}.input_layernorm.weight"
            ln1 = norm_weight(b, "attn_norm", key, d, cdt)
            h = attention(b, b.rms_norm(x, ln1, cfg.rms_norm_eps, role="attn_norm"), rope, st, i)
            x = b.add(x, h, role="attn_residual")
            key = f"model.layers.{i}.post_attention_layernorm.weight"
            ln2 = norm_weight(b, "ffn_norm", key, d, cdt)
            h = b.rms_norm(x, ln2, cfg.rms_norm_eps, role="ffn_norm")
            if cfg.is_moe_layer(i):
                h, probs = moe(b, h, st, i)
                router_probs.append(probs)
            else:
                h = mlp(b, h, st, i)
            x = b.add(x, h, role="ffn_residual")
    if cached and entry != "verify":  # generation needs only the last position's logits
        x = b.slice_last(x)  # (b, s, d) -> (b, d)
    norm = norm_weight(b, "output_norm", "model.norm.weight", d, cdt)
    x = b.rms_norm(x, norm, cfg.rms_norm_eps, role="output_norm")
    if cfg.tie_word_embeddings:
        head = embed if embed.dtype == cdt else b.cast(embed, cdt, role="output.cast")
        lead = "bs"[: len(x.shape) - 1]
        # (b, s, d) x (v, d) -> (b, s, v)
        logits = b.einsum(f"{lead}d,vd->{lead}v", x, head, role="output", tags=LINEAR)
    else:
        logits = linear(b, x, "output", "lm_head", cfg.vocab_size, False, weight_dtype)
    if entry == "loss":
        targets = b.input("targets", ("batch", "seq"), "i64")
        loss = b.cross_entropy(logits, targets)
        if cfg.output_router_logits and router_probs:  # transformers adds it when asked to
            k, coef = cfg.num_experts_per_tok, cfg.router_aux_loss_coef
            aux = b.moe_aux_loss(router_probs, k, coef, role="moe_aux_loss")
            loss = b.add(loss, aux, role="loss_total")
        b.output("loss", loss)
    else:
        b.output("logits", logits)
    return b.graph
