"""Generation benchmark: SmolLM2-135M (random fp32 weights), 32-token prompt, 128 new tokens,
batch 1 and 8: time to first token, prefill and decode tokens/s, peak RSS; beside the
memory-bandwidth limit (fp32 weight bytes read per token / bandwidth measured in this run)
and, with --torch-python, transformers' ``generate`` run interleaved.

    python benchmarks/generate.py --torch-python /path/to/torch-venv/bin/python \
        --kernels numpy,numba --rounds 3

Every case runs in its own subprocess; ``--rounds`` repeats them interleaved (bandwidth,
einplan on each ``--kernels`` backend, PyTorch) and reports medians. Prints a table, writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, peak_rss_kib, run_torch_case, subprocess_json, write_results  # noqa: E402

CONFIG = ROOT / "configs" / "smollm2-135m.json"


def measure_bandwidth() -> dict:
    """Copy bandwidth of this machine now (read + write, 2 BLAS-free numpy threads)."""
    import threading
    import time

    import numpy as np

    n = 64 * 2**20 // 4  # 64 MiB per thread, far beyond the caches
    src = [np.ones(n, np.float32) for _ in range(2)]
    dst = [np.empty(n, np.float32) for _ in range(2)]
    best = 0.0
    for _ in range(10):
        threads = [
            threading.Thread(target=np.copyto, args=(d, s)) for d, s in zip(dst, src, strict=True)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = max(best, 2 * 2 * n * 4 / (time.perf_counter() - t0) / 1e9)
    return {"copy_gbs": best}


def run_case_here(batch: int, prompt: int, new: int, reps: int, kernels: str) -> dict:
    """One einplan generation case in this process, on one kernels backend."""
    import numpy as np

    import einplan
    from einplan.runtime.generate import GenerationRequest, Generator
    from einplan.runtime.sampling import SamplingConfig

    plan = einplan.compile_model(CONFIG)
    session = einplan.Session(plan, random_seed=0, kernels=kernels)  # numba: weights as panels
    gen = Generator(plan, session.weights, kernels=kernels)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 49152, prompt).tolist() for _ in range(batch)]
    # warm-up at the measured request's size: kernels, buffers, the binding of its context
    gen.generate(GenerationRequest(prompts, new, SamplingConfig()))
    runs = [gen.generate(GenerationRequest(prompts, new)).stats for _ in range(reps)]
    steps = [s for r in runs for s in r.decode_step_s]
    p50 = statistics.median(steps)
    return {
        "ttft_s": statistics.median(r.ttft_s for r in runs),
        "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_s for r in runs),
        "decode_step_ms_p50": p50 * 1e3,
        "decode_step_ms_p99": statistics.quantiles(steps, n=100)[98] * 1e3,
        "tokens_per_s": batch / p50,
        "weights_bytes": runs[0].weights_bytes,
        "kv_cache_bytes": runs[0].kv_cache_bytes,
        "peak_rss_kib": peak_rss_kib(),
        "kernels": kernels,
    }


def median_of(runs: list[dict]) -> dict:
    """The first run with every number replaced by its median over ``runs`` (rounds kept)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return dict(runs[0])
    out = dict(ok[0])
    for k, v in ok[0].items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in ok if k in r)
    out["rounds"] = ok
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-python", help="python of a venv with torch 2.13.0 + transformers")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="cases interleaved round by round")
    ap.add_argument("--kernels", default="numba", help="einplan's backends, e.g. numpy,numba")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "generate.json"))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--case-kernels", default="numba", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case == "bandwidth":
        print(json.dumps(measure_bandwidth()))
        return
    if args.case:
        b, p, n = (int(x) for x in args.case.split(":"))
        print(json.dumps(run_case_here(b, p, n, args.reps, args.case_kernels)))
        return

    me = [sys.executable, __file__, "--reps", str(args.reps)]
    batches = [int(b) for b in args.batches.split(",")]
    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):  # bandwidth, einplan per backend, PyTorch: drift hits all
        for batch in batches:
            bw = subprocess_json([*me, "--case", "bandwidth"])
            runs.setdefault(("machine", "", batch), []).append(bw)
            for kernels in args.kernels.split(","):
                case = ["--case", f"{batch}:{args.prompt}:{args.new}", "--case-kernels", kernels]
                r = subprocess_json([*me, *case])
                if "tokens_per_s" in r and "copy_gbs" in bw:
                    limit = bw["copy_gbs"] * 1e9 / r["weights_bytes"] * batch
                    r["bandwidth_limit_tokens_per_s"] = limit
                    r["share_of_bandwidth_limit"] = r["tokens_per_s"] / limit
                runs.setdefault(("einplan", kernels, batch), []).append(r)
                tps = r.get("tokens_per_s", 0)
                print(f"einplan {kernels} batch {batch}: {tps:.1f} tok/s", file=sys.stderr)
            if args.torch_python:
                t = run_torch_case(
                    args.torch_python, f"smollm2-135m:decode:{batch}:{args.prompt}", 1, 3, 3.0
                )
                runs.setdefault(("pytorch-eager", "", batch), []).append(t)
                tps = t.get("tokens_per_s", 0)
                print(f"pytorch batch {batch}: {tps:.1f} tok/s", file=sys.stderr)
    results = []
    for (engine, _, batch), rs in runs.items():
        r = median_of(rs)
        kind = "bandwidth" if engine == "machine" else "generate"
        r.update(engine=engine, kind=kind, batch=batch)
        results.append(r)
    for r in results:  # against transformers' generate at the same batch
        peer = next(
            (t for t in results if t["engine"] == "pytorch-eager" and t["batch"] == r["batch"]),
            None,
        )
        if r["engine"] == "einplan" and peer and "tokens_per_s" in r and "tokens_per_s" in peer:
            r["decode_vs_transformers"] = r["tokens_per_s"] / peer["tokens_per_s"]
            if peer.get("ttft_s_median"):
                r["ttft_vs_transformers"] = r["ttft_s"] / peer["ttft_s_median"]

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SmolLM2-135M generation (fp32, prompt {args.prompt}, 2 cores)")
    for col in (
        "engine",
        "batch",
        "TTFT ms",
        "prefill tok/s",
        "decode tok/s",
        "p50 / p99 ms",
        "bandwidth limit",
        "share",
        "x transformers decode / TTFT",
        "peak RSS MiB",
    ):
        t.add_column(col, justify="left" if col == "engine" else "right")
    for r in results:
        if r["kind"] == "bandwidth" or "error" in r:
            if "error" in r:
                t.add_row(r["engine"], str(r["batch"]), "error: " + r["error"][-50:])
            continue
        if r["engine"] == "einplan":
            t.add_row(
                f"einplan ({r['kernels']})",
                str(r["batch"]),
                f"{r['ttft_s'] * 1e3:.0f}",
                f"{r['prefill_tokens_per_s']:.0f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['decode_step_ms_p50']:.1f} / {r['decode_step_ms_p99']:.1f}",
                f"{r.get('bandwidth_limit_tokens_per_s', 0):.1f}",
                f"{r.get('share_of_bandwidth_limit', 0):.0%}",
                f"{r.get('decode_vs_transformers', 0):.2f} / "
                f"{r.get('ttft_vs_transformers', 0):.2f}",
                f"{r['peak_rss_kib'] / 1024:.0f}",
            )
        else:
            t.add_row(
                "transformers generate",
                str(r["batch"]),
                f"{r.get('ttft_s_median', 0) * 1e3:.0f}",
                "",
                f"{r['tokens_per_s']:.1f}",
                "",
                "",
                "",
                "",
                f"{r.get('peak_rss_kib', 0) / 1024:.0f}",
            )
    Console(width=140).print(t)
    write_results(args.json, results)


if __name__ == "__main__":
    main()
