"""The compile summary: nodes per op, parameters, FLOPs per token, memory, pass times."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from einplan.compiler.ir import Graph
from einplan.compiler.ops import Op, count_flops
from einplan.compiler.passes.memory import estimate_memory, saved_for_backward
from einplan.compiler.plan import Plan
from einplan.compiler.symbolic import evaluate


def flops_per_token(plan: Plan, seq: int, entry: str = "forward") -> float:
    """Forward FLOPs per token at batch 1 and sequence ``seq``, summed over all steps."""
    g = plan.entry(entry)
    nodes = g.by_id()
    dims = {"batch": 1, "seq": seq}
    total = sum(
        evaluate(count_flops(n.op, [nodes[i].shape for i in n.inputs], n.shape, n.attrs), dims)
        for n in g.nodes
    )
    return total / seq


def moe_summary(plan: Plan, seq: int) -> str:
    """Top-k of E: the routed expert FFNs cost k/E of running every expert on every token."""
    cfg, g = plan.config, plan.entry("forward")
    k, e = cfg["num_experts_per_tok"], cfg["num_experts"]
    nodes, dims = g.by_id(), {"batch": 1, "seq": seq}
    experts = sum(
        evaluate(count_flops(n.op, [nodes[i].shape for i in n.inputs], n.shape, n.attrs), dims)
        for n in g.nodes
        if n.op is Op.MOE_EXPERT
    )
    return (
        f"top-{k} of {e} per token: expert FFN FLOPs {experts / seq / 1e6:,.2f} MFLOP per token "
        f"= {k}/{e} ({k / e:.0%}) of all {e} experts on every token"
    )


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def kernels_line(plan: Plan) -> str:
    """Which kernels backend would run what: chosen when the plan is bound, not stored."""
    from einplan.runtime.backends import available_backends, default_backend
    from einplan.runtime.backends.numba_panel_factories import panel_keys

    g = plan.entry("decode") if "decode" in plan.entries else plan.entry("forward")
    compiled = sum(
        1
        for n in g.nodes
        if n.op.value == "einsum" and type(n.attrs.get("recipe")).__name__ == "QMatmulRecipe"
    )
    installed = ", ".join(available_backends())
    panels = len(panel_keys(plan))
    quantised = f"{compiled} quantised products of {g.name} (<= 16 rows), " if compiled else ""
    held = (
        f"holds {panels} float32 weights as panels and computes every product of them; "
        if panels
        else "computes float32 products of <= 8 rows (GEMV); "
    )
    what = (
        f"numba {held}{quantised}RMSNorm, RoPE, SwiGLU, a forward's causal flash attention "
        "(one kernel; other flash steps its exp) and the decode-sized ops between products; "
        "numpy the rest"
    )
    return f"{default_backend()} by default (installed: {installed}; --kernels); {what}"


def attention_line(plan: Plan) -> str:
    """What the flash pass chose for each entry, and why (compiler/passes/flash.py)."""
    parts = []
    for name, g in plan.entries.items():
        a = g.meta.get("attention")
        if a is None:
            continue
        if a["kind"] == "flash" and a.get("direct") == a["nodes"]:
            parts.append(f"{name}: flash x{a['nodes']} direct ({a['why']})")
        elif a["kind"] == "flash":
            tiled = f"tiled from {a['min_tiled']} keys" if a["min_tiled"] else "always tiled"
            parts.append(
                f"{name}: flash x{a['nodes']} (tiles {a['block_q']} queries x {a['block_k']} "
                f"keys, {tiled}; {a['why']})"
            )
        else:
            parts.append(f"{name}: plain ({a['why']})")
    return "; ".join(parts)


def checkpoint_line(g: Graph) -> str:
    """The activation checkpointing policy of a training entry and what it recomputes."""
    info = g.meta.get("checkpoint")
    if not info:
        return "none (every activation the backward pass reads is kept)"
    return f"{info['policy']}: {info['recomputed_steps']} forward steps recomputed in the backward"


def print_compile_summary(plan: Plan, batch: int, seq: int, console: Console | None = None) -> None:
    """Print what a compiled plan holds and costs."""
    console = console or Console()
    g = plan.entry("forward")
    ops = Counter(n.op.value for n in g.nodes)
    t = Table(title="nodes per op")
    t.add_column("op")
    t.add_column("nodes", justify="right")
    for op, k in ops.most_common():
        t.add_row(op, str(k))
    t.add_row("total", str(len(g.nodes)), style="bold")
    console.print(t)
    mem = estimate_memory(g, {"batch": batch, "seq": seq})
    s = Table(title=f"model (batch {batch}, seq {seq})", show_header=False)
    s.add_row("parameters", f"{plan.meta['parameters']:,}")
    s.add_row("weight dtype", plan.meta["weight_dtype"])
    if plan.meta.get("quant"):
        q = plan.meta["quant"]
        layout = f"groups of {q['group_size']}" if q["scheme"].startswith("w4") else "per channel"
        sym = "symmetric" if q["symmetric"] else "asymmetric"
        acts = "" if q["scheme"].endswith("a16") else f", {q['activations']} activation scales"
        s.add_row("quantisation", f"{q['scheme']} ({layout}, {sym}{acts})")
    if plan.meta.get("lora"):
        lora = plan.meta["lora"]
        s.add_row(
            "LoRA",
            f"r={lora['r']} alpha={lora['alpha']:g} on {', '.join(lora['targets'])}"
            + (f", dropout {lora['dropout']:g}" if lora["dropout"] else ""),
        )
    s.add_row("forward FLOPs per token", f"{flops_per_token(plan, seq) / 1e6:,.1f} MFLOP")
    if plan.config.get("num_experts"):
        s.add_row("routed experts", moe_summary(plan, seq))
    s.add_row("weights", mib(mem["weights_bytes"]))
    s.add_row("activation buffers (arena)", mib(mem["arena_bytes"]))
    s.add_row("kernels' scratch", mib(mem["scratch_bytes"]))
    if mem.get("transient_bytes"):
        s.add_row("a step's own temporaries", mib(mem["transient_bytes"]))
    s.add_row("outputs", mib(mem["outputs_bytes"]))
    s.add_row("estimated peak", mib(mem["peak_bytes"]))
    if "train_step" in plan.entries:  # what the training step keeps for its reverse graph
        saved = saved_for_backward(plan.entry("train_step"), {"batch": batch, "seq": seq})
        s.add_row("train step: saved for backward", mib(saved))
    s.add_row("kernels", kernels_line(plan))
    s.add_row("attention", attention_line(plan))
    sched = g.meta.get("schedule", {})
    s.add_row(
        "dependency levels",
        f"{sched.get('levels')} ({sched.get('parallel_levels')} with independent steps)",
    )
    for name in plan.entries:
        reason = plan.entry(name).meta.get("schedule", {}).get("threads_reason")
        if reason:
            s.add_row(f"threads ({name})", reason)
    cache = g.meta.get("path_cache", {})
    s.add_row(
        "contraction paths", f"{cache.get('hits', 0)} from cache, {cache.get('misses', 0)} planned"
    )
    if "train_step" in plan.entries:
        t = plan.entry("train_step")
        parts = Counter(n.phase() for n in t.nodes)
        s.add_row("train_step nodes", ", ".join(f"{v} {k}" for k, v in parts.items()))
        s.add_row(
            "train FLOPs per token", f"{flops_per_token(plan, seq, 'train_step') / 1e6:,.1f} MFLOP"
        )
        train_mem = estimate_memory(t, {"batch": batch, "seq": seq})
        s.add_row("activation checkpointing", checkpoint_line(t))
        s.add_row(f"train activations (arena, batch {batch})", mib(train_mem["arena_bytes"]))
        s.add_row(f"train estimated peak (batch {batch})", mib(train_mem["peak_bytes"]))
    s.add_row("compile time", f"{plan.meta['compile_seconds']:.3f} s")
    console.print(s)
    p = Table(title="passes")
    for col in ("entry", "pass", "nodes in", "nodes out", "ms"):
        p.add_column(col, justify="right" if col not in ("entry", "pass") else "left")
    for st in plan.meta["passes"]:
        p.add_row(
            st["entry"],
            st["pass"],
            str(st["nodes_in"]),
            str(st["nodes_out"]),
            f"{st['seconds'] * 1e3:.1f}",
        )
    console.print(p)
