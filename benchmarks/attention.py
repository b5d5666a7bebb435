"""Flash attention benchmark (issue #14 part 1): SmolLM2-135M's attention (9 query heads,
3 KV heads, head dim 64, float32, batch 1), flash_attention against the plain scores ->
softmax -> context chain, each compiled and run as a plan.

Parts (``--parts``, comma-separated; default all):

- ``tiles``: one layer's attention at several lengths for each (block_q, block_k) and
  untiled, beside the plain chain; the constants of compiler/passes/flash.py come from it.
- ``memory``: peak bytes NumPy allocates (tracemalloc) binding and running one layer's
  attention, flash and plain, at 256 ... 4096 tokens; and its time.
- ``decode``: one query over a cache of 256 ... 4096 slots (with the mask), flash and plain.
- ``model``: the whole forward at 1x1024 and 1x4096 (random weights), einplan flash, einplan
  plain and PyTorch eager (SDPA; ../shared/perf/peer/torch_baselines.py) in turn, each in its
  own process, ``--rounds`` times.

    python benchmarks/attention.py --torch-python /work/torch-venv/bin/python

Prints a table per part and writes JSON (default benchmarks/results/attention.json). Peak RSS
of a model case is its process's ru_maxrss, which Linux carries over from the parent: run the
model part first (the default order) or alone, before this process holds large arrays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, run_torch_case, subprocess_json, timed, write_results  # noqa: E402

CONFIG = ROOT / "configs" / "smollm2-135m.json"
N, G, H = 3, 3, 64  # SmolLM2-135M: KV heads, query heads per KV head, head dim
TILES = [(64, 512), (128, 256), (128, 512), (128, 1024), (256, 512), (256, 1024), (256, 2048)]
SHORT = {16, 32, 64, 128}  # lengths where only plain, untiled and the chosen tiles are timed


def attention_plan(seq: int, attention: str, decode: bool = False, tiles=None, min_tiled=None):
    """One layer's attention chain as the model traces it, compiled by the passes that matter
    (flash, contract, schedule, memory); ``tiles`` and ``min_tiled`` override the pass's."""
    from einplan.compiler.passes import flash
    from einplan.compiler.pipeline import PassContext, run_pipeline
    from einplan.compiler.trace import Builder

    saved = flash.BLOCK_Q, flash.BLOCK_K, flash.MIN_TILED
    if tiles:
        flash.BLOCK_Q, flash.BLOCK_K = tiles
    if min_tiled is not None:
        flash.MIN_TILED = min_tiled
    try:
        b = Builder({"batch": 1, "seq": seq, "kv": seq}, "decode" if decode else "forward")
        s = 1 if decode else "seq"
        q = b.input("q", ("batch", s, N, G, H), "f32")
        if decode:
            k = b.input("k", ("batch", N, "kv", H), "f32")
            v = b.input("v", ("batch", N, "kv", H), "f32")
            mask = b.input("mask", ("batch", 1, "kv"), "f32")
            # (b, s, n, g, h) x (b, n, t, h) -> (b, n, g, s, t)
            scores = b.einsum("bsngh,bnth->bngst", q, k, role="attn_scores")
            probs = b.softmax(scores, mask=mask, role="attn_softmax")
            # (b, n, g, s, t) x (b, n, t, h) -> (b, s, n, g, h)
            ctx = b.einsum("bngst,bnth->bsngh", probs, v, role="attn_ctx")
        else:
            k = b.input("k", ("batch", "seq", N, H), "f32")
            v = b.input("v", ("batch", "seq", N, H), "f32")
            # (b, s, n, g, h) x (b, t, n, h) -> (b, n, g, s, t)
            scores = b.einsum("bsngh,btnh->bngst", q, k, role="attn_scores")
            probs = b.softmax(scores, causal=True, role="attn_softmax")
            # (b, n, g, s, t) x (b, t, n, h) -> (b, s, n, g, h)
            ctx = b.einsum("bngst,btnh->bsngh", probs, v, role="attn_ctx")
        b.output("ctx", ctx)
        ctx_ = PassContext(attention=attention, use_path_cache=False)
        return run_pipeline(b.graph, ctx_, ("flash", "contract", "schedule", "memory"))
    finally:
        flash.BLOCK_Q, flash.BLOCK_K, flash.MIN_TILED = saved


def attention_feed(seq: int, decode: bool = False) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    s = 1 if decode else seq

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.5

    if decode:
        return {
            "q": rand(1, 1, N, G, H),
            "k": rand(1, N, seq, H),
            "v": rand(1, N, seq, H),
            "mask": np.zeros((1, 1, seq), np.float32),
        }
    return {"q": rand(1, s, N, G, H), "k": rand(1, seq, N, H), "v": rand(1, seq, N, H)}


def time_side_by_side(graphs: dict, feed: dict, args) -> dict:
    """Median seconds of each graph's run, the graphs taking turns rep by rep."""
    from einplan.runtime.executor import Executor

    runs = {name: Executor(g, {}, kernels=args.kernels) for name, g in graphs.items()}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for ex in runs.values():
        timed(lambda ex=ex: ex.run(feed), args.warmup, 0, 0)
    t_end = time.perf_counter() + args.min_time
    while min(map(len, samples.values())) < args.reps or time.perf_counter() < t_end:
        for name, ex in runs.items():
            samples[name] += timed(lambda ex=ex: ex.run(feed), 0, 1, 0)
    return {name: statistics.median(v) for name, v in samples.items()}


def peak_bytes(graph, feed: dict) -> int:
    """Peak bytes NumPy allocates binding the graph and running it once (inputs excluded)."""
    from einplan.runtime.executor import Executor

    tracemalloc.start()
    Executor(graph, {}).run(feed)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def part_tiles(args) -> list[dict]:
    rows = []
    for seq in args.tile_lengths:
        graphs = {"plain": attention_plan(seq, "plain"), "untiled": attention_plan(seq, "auto")}
        graphs["untiled"] = attention_plan(seq, "flash", min_tiled=10**9)
        from einplan.compiler.passes import flash

        for bq, bk in TILES:
            if seq not in SHORT or (bq, bk) == (flash.BLOCK_Q, flash.BLOCK_K):
                graphs[f"{bq}x{bk}"] = attention_plan(seq, "flash", tiles=(bq, bk), min_tiled=0)
        med = time_side_by_side(graphs, attention_feed(seq), args)
        for name, s in med.items():
            rows.append({"part": "tiles", "seq": seq, "variant": name, "seconds": s})
            print(f"tiles seq {seq} {name}: {s * 1e3:.1f} ms", file=sys.stderr)
    return rows


def part_memory(args) -> list[dict]:
    rows = []
    for seq in args.lengths:
        feed = attention_feed(seq)
        graphs = {a: attention_plan(seq, a) for a in ("flash", "plain")}
        med = time_side_by_side(graphs, feed, args)
        for a, g in graphs.items():
            rows.append(
                {
                    "part": "memory",
                    "seq": seq,
                    "variant": a,
                    "peak_bytes": peak_bytes(g, feed),
                    "seconds": med[a],
                }
            )
            mib = rows[-1]["peak_bytes"] / 2**20
            print(f"memory seq {seq} {a}: {mib:.1f} MiB", file=sys.stderr)
    return rows


def part_decode(args) -> list[dict]:
    rows = []
    for kv in args.lengths:
        graphs = {a: attention_plan(kv, a, decode=True) for a in ("flash", "plain")}
        med = time_side_by_side(graphs, attention_feed(kv, decode=True), args)
        for a, s in med.items():
            rows.append({"part": "decode", "seq": kv, "variant": a, "seconds": s})
            print(f"decode kv {kv} {a}: {s * 1e6:.0f} us", file=sys.stderr)
    return rows


def run_model_here(attention: str, seq: int, args) -> dict:
    """The whole forward in this process (a subprocess of :func:`part_model`)."""
    import resource

    import numpy as np

    import einplan

    plan = einplan.compile_model(CONFIG, entries=("forward",), attention=attention)
    session = einplan.Session(plan, random_seed=0)
    ids = np.random.default_rng(1).integers(1, 49152, (1, seq))
    samples = timed(lambda: session.forward(ids), args.warmup, args.reps, args.min_time)
    med = statistics.median(samples)
    return {
        "samples_s": samples,
        "step_s_median": med,
        "tokens_per_s": seq / med,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def part_model(args) -> list[dict]:
    rows = []
    for round_ in range(args.rounds):
        for seq in args.model_lengths:
            # a forward of --long-from tokens takes minutes on 2 busy cores: one round, no
            # warm-up, one timed run per engine
            long = seq >= args.long_from
            if long and round_:
                continue
            warmup, reps, min_time = (args.warmup, args.reps, args.min_time)
            if long:
                warmup, reps, min_time = 0, 1, 0.0
            for attention in ("flash", "plain"):
                cmd = [sys.executable, __file__, "--case", f"{attention}:{seq}"]
                cmd += ["--warmup", str(warmup), "--reps", str(reps)]
                cmd += ["--min-time", str(min_time)]
                r = subprocess_json(cmd)
                r.update(part="model", engine=f"einplan-{attention}", seq=seq)
                rows.append(r)
                tps = r.get("tokens_per_s", 0)
                print(f"model {seq} {attention}: {tps:.1f} tok/s", file=sys.stderr)
            if args.torch_python:
                case = f"smollm2-135m:fwd:1:{seq}"
                r = run_torch_case(args.torch_python, case, warmup, reps, min_time)
                r.update(part="model", seq=seq)
                rows.append(r)
                print(f"model {seq} torch: {r.get('tokens_per_s', 0):.1f} tok/s", file=sys.stderr)
    return rows


def print_tables(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    by = {}
    for r in rows:
        by.setdefault(r["part"], []).append(r)
    if "tiles" in by:
        t = Table(title="one layer's attention, ms (median; float32, 9 heads / 3 KV, hd 64)")
        t.add_column("variant")
        lengths = sorted({r["seq"] for r in by["tiles"]})
        for s in lengths:
            t.add_column(f"seq {s}", justify="right")
        for v in dict.fromkeys(r["variant"] for r in by["tiles"]):
            cells = {r["seq"]: r["seconds"] for r in by["tiles"] if r["variant"] == v}
            t.add_row(v, *(f"{cells[s] * 1e3:.2f}" if s in cells else "" for s in lengths))
        console.print(t)
    if "memory" in by:
        t = Table(title="one layer's attention: peak MiB allocated (tracemalloc) and ms")
        for col in ("seq", "flash MiB", "plain MiB", "flash ms", "plain ms"):
            t.add_column(col, justify="right")
        for s in sorted({r["seq"] for r in by["memory"]}):
            c = {r["variant"]: r for r in by["memory"] if r["seq"] == s}
            mem = [f"{c[a]['peak_bytes'] / 2**20:.1f}" for a in ("flash", "plain")]
            ms = [f"{c[a]['seconds'] * 1e3:.2f}" for a in ("flash", "plain")]
            t.add_row(str(s), *mem, *ms)
        console.print(t)
    if "decode" in by:
        t = Table(title="decode: one query over the cache, us (median)")
        for col in ("kv", "flash", "plain"):
            t.add_column(col, justify="right")
        for s in sorted({r["seq"] for r in by["decode"]}):
            c = {r["variant"]: r["seconds"] for r in by["decode"] if r["seq"] == s}
            t.add_row(str(s), f"{c['flash'] * 1e6:.0f}", f"{c['plain'] * 1e6:.0f}")
        console.print(t)
    if "model" in by:
        t = Table(title="SmolLM2-135M forward, batch 1 (fp32, random weights)")
        for col in ("seq", "engine", "tok/s (median of rounds)", "peak RSS MiB", "vs PyTorch"):
            t.add_column(col, justify="left" if col == "engine" else "right")
        for s in sorted({r["seq"] for r in by["model"]}):
            tps = {}
            rss = {}
            for r in by["model"]:
                if r["seq"] == s and "tokens_per_s" in r:
                    tps.setdefault(r["engine"], []).append(r["tokens_per_s"])
                    rss[r["engine"]] = r.get("peak_rss_kib", 0) / 1024
            ref = statistics.median(tps["pytorch-eager"]) if "pytorch-eager" in tps else None
            for e, v in tps.items():
                ratio = f"{statistics.median(v) / ref:.2f}x" if ref and e != "pytorch-eager" else ""
                t.add_row(str(s), e, f"{statistics.median(v):.1f}", f"{rss[e]:.0f}", ratio)
        console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="model,tiles,memory,decode")
    ap.add_argument("--torch-python", help="python of a venv with torch 2.13.0 + transformers")
    ap.add_argument("--lengths", default="256,512,1024,2048,4096")
    ap.add_argument("--tile-lengths", default="256,512,1024,4096")
    ap.add_argument("--model-lengths", default="1024,4096")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the model part")
    ap.add_argument("--long-from", type=int, default=4096, help="model lengths timed once")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--kernels", help="kernels backend (numpy, numba; default: the fastest)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "attention.json"))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        attention, seq = args.case.split(":")
        print(json.dumps(run_model_here(attention, int(seq), args)))
        return
    for name in ("lengths", "tile_lengths", "model_lengths"):
        setattr(args, name, [int(x) for x in getattr(args, name).split(",")])
    parts = {"tiles": part_tiles, "memory": part_memory, "decode": part_decode}
    parts["model"] = part_model
    rows = []
    for name in args.parts.split(","):
        rows += parts[name](args)
        write_results(args.json, rows)  # what is measured so far, in case a later part fails
    print_tables(rows)


if __name__ == "__main__":
    main()
