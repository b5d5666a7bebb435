"""Quantised decode benchmark: SmolLM2-135M decode tokens/s with fp32, W8A16 and W4A16 (g64)
weights, beside each one's memory-bandwidth limit (weight bytes read per token / copy
bandwidth measured in this run), with the weights file size and the peak RSS of the process.

    einplan convert SmolLM2-135M-Instruct.Q4_1.gguf -o smol/      # or any SmolLM2 HF folder
    python benchmarks/quant.py --weights smol/

The quantised weights are written once by ``einplan quantize`` (into --work, by default under
EINPLAN_CACHE_DIR or ~/.cache/einplan) and loaded as they are, as a deployment would. Every
case runs in its own subprocess (so peak RSS is its own): RSS is read after imports and
compilation and after binding the weights and a warm-up. ``--cores 1`` pins each case to one
core (steadier on a shared host). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, peak_rss_kib, subprocess_json, write_results  # noqa: E402
from generate import measure_bandwidth  # noqa: E402

SCHEMES = {
    "fp32": None,
    "w8a16": {"scheme": "w8a16"},
    "w4a16": {"scheme": "w4a16", "group_size": 64},
}


def rss_kib() -> int:
    """Resident memory of this process now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_case_here(
    scheme: str, weights: str, prompt: int, new: int, reps: int, kernels: str = "numpy"
) -> dict:
    """Decode with one scheme and kernels backend in this process (``weights`` "random":
    seeded random weights of configs/smollm2-135m.json, quantised when bound)."""
    import numpy as np

    from einplan.api import compile_model, plan_config
    from einplan.formats.weights import load_weights, random_weights
    from einplan.runtime.backends import get_backend
    from einplan.runtime.generate import GenerationRequest, Generator
    from einplan.runtime.sampling import SamplingConfig

    source = str(ROOT / "configs" / "smollm2-135m.json") if weights == "random" else weights
    plan = compile_model(source, quant=SCHEMES[scheme], entries=("prefill", "decode"))
    before = rss_kib()
    if weights == "random":
        arrays = random_weights(plan.entry("decode"), 0)
    else:
        tied = plan_config(plan).tie_word_embeddings
        arrays = load_weights(plan.entry("decode"), weights, tied=tied)
    arrays = get_backend(kernels).pack_weights(plan, arrays)  # as Session binds them
    gen = Generator(plan, arrays, kernels=kernels)
    prompts = [np.random.default_rng(1).integers(1, 49152, prompt).tolist()]
    # warm-up at the measured request's size: kernels, buffers, the binding of its context
    gen.generate(GenerationRequest(prompts, new, SamplingConfig()))
    bound = rss_kib()
    runs = [gen.generate(GenerationRequest(prompts, new)).stats for _ in range(reps)]
    steps = [s for r in runs for s in r.decode_step_s]
    p50 = statistics.median(steps)
    return {
        "kernels": kernels,
        "decode_steps_by_backend": runs[0].decode_steps_by_backend,
        "decode_step_ms_p50": p50 * 1e3,
        "decode_step_ms_p99": statistics.quantiles(steps, n=100)[98] * 1e3,
        "tokens_per_s": 1 / p50,
        "weights_bytes": runs[0].weights_bytes,
        "rss_before_weights_kib": before,
        "rss_after_warmup_kib": bound,
        "weights_rss_kib": bound - before,
        "peak_rss_kib": peak_rss_kib(),
    }


def quantize_once(weights: str, scheme: str, work: Path) -> Path:
    """The quantised weights folder for a scheme (made by einplan quantize if missing)."""
    out = work / f"{Path(weights).name}-{scheme}"
    if not (out / "model.safetensors").exists():
        quant = SCHEMES[scheme]
        cmd = [sys.executable, "-m", "einplan", "quantize", weights, "--scheme", quant["scheme"]]
        cmd += ["--group-size", str(quant.get("group_size", 64)), "-o", str(out)]
        subprocess.run(cmd, check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--weights",
        required=True,
        help="SmolLM2-135M HF folder (float weights), or 'random' (seeded random weights)",
    )
    ap.add_argument("--kernels", default="numpy,numba", help="kernels backends to compare")
    ap.add_argument(
        "--rounds", type=int, default=1, help="run every case this many times, interleaved"
    )
    cache = Path(os.environ.get("EINPLAN_CACHE_DIR", Path.home() / ".cache" / "einplan"))
    ap.add_argument(
        "--work", default=str(cache / "quant-weights"), help="where the quantised weights go"
    )
    ap.add_argument("--schemes", default="fp32,w8a16,w4a16")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument(
        "--cores", type=int, default=0, help="pin each case to this many cores (0: all)"
    )
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "quant.json"))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--case-kernels", default="numpy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case == "bandwidth":
        print(json.dumps(measure_bandwidth()))
        return
    if args.case:
        r = run_case_here(
            args.case, args.weights, args.prompt, args.new, args.reps, args.case_kernels
        )
        print(json.dumps(r))
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, __file__, "--prompt", str(args.prompt), "--new", str(args.new)]
    me += ["--reps", str(args.reps)]
    if args.cores:  # taskset: BLAS and the quantised kernels see only these cores
        me = ["taskset", "-c", f"0-{args.cores - 1}", *me]
    bw = subprocess_json([*me, "--weights", args.weights, "--case", "bandwidth"])
    results = [{"engine": "machine", "kind": "bandwidth", **bw}]
    cases = [(s, k) for s in args.schemes.split(",") for k in args.kernels.split(",")]
    rounds: dict[tuple[str, str], list[dict]] = {c: [] for c in cases}
    for _ in range(args.rounds):  # A, B, C, A, B, C, ...: drift on a shared host hits all
        for scheme, kernels in cases:
            if args.weights == "random" or scheme == "fp32":
                folder = args.weights
            else:
                folder = str(quantize_once(args.weights, scheme, work))
            cmd = [*me, "--weights", folder, "--case", scheme, "--case-kernels", kernels]
            r = subprocess_json(cmd)
            r.update(engine="einplan", kind="decode", scheme=scheme, weights=folder)
            r.setdefault("kernels", kernels)
            r["file_bytes"] = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
            rounds[(scheme, kernels)].append(r)
            tps = r.get("tokens_per_s", 0)
            print(f"{scheme} {kernels}: {tps:.1f} tok/s", file=sys.stderr)
    for case in cases:
        runs = [r for r in rounds[case] if "tokens_per_s" in r]
        r = dict(rounds[case][0]) if not runs else dict(runs[0])
        if runs:
            r["tokens_per_s_rounds"] = [x["tokens_per_s"] for x in runs]
            r["tokens_per_s"] = statistics.median(r["tokens_per_s_rounds"])
            r["decode_step_ms_p50"] = 1e3 / r["tokens_per_s"]
        if "tokens_per_s" in r and "copy_gbs" in bw:
            r["bandwidth_limit_tokens_per_s"] = bw["copy_gbs"] * 1e9 / r["weights_bytes"]
            r["share_of_bandwidth_limit"] = r["tokens_per_s"] / r["bandwidth_limit_tokens_per_s"]
        results.append(r)
    # each scheme against fp32 decode on the same kernels backend (numba compiles fp32's GEMV
    # and the ops between products too)
    base = {
        r["kernels"]: r["tokens_per_s"]
        for r in results[1:]
        if r.get("scheme") == "fp32" and "tokens_per_s" in r
    }
    for r in results[1:]:
        if base.get(r.get("kernels")) and "tokens_per_s" in r:
            r["speedup_vs_fp32"] = r["tokens_per_s"] / base[r["kernels"]]

    from rich.console import Console
    from rich.table import Table

    cores = args.cores or len(os.sched_getaffinity(0))
    t = Table(title=f"SmolLM2-135M decode, batch 1, prompt {args.prompt} ({cores} cores)")
    cols = ("scheme", "kernels", "decode tok/s", "x fp32 (same kernels)", "p50 / p99 ms")
    cols += ("weights MiB",)
    cols += ("file MiB",)
    cols += ("bandwidth limit tok/s", "share", "weights RSS MiB", "peak RSS MiB")
    for col in cols:
        t.add_column(col, justify="left" if col == "scheme" else "right")
    for r in results[1:]:
        if "error" in r:
            t.add_row(r["scheme"], r.get("kernels", ""), "error: " + r["error"][-60:])
            continue
        t.add_row(
            r["scheme"],
            r["kernels"],
            f"{r['tokens_per_s']:.1f}",
            f"{r.get('speedup_vs_fp32', 0):.2f}",
            f"{r['decode_step_ms_p50']:.1f} / {r['decode_step_ms_p99']:.1f}",
            f"{r['weights_bytes'] / 2**20:.0f}",
            f"{r['file_bytes'] / 2**20:.0f}",
            f"{r.get('bandwidth_limit_tokens_per_s', 0):.0f}",
            f"{r.get('share_of_bandwidth_limit', 0):.0%}",
            f"{r['weights_rss_kib'] / 1024:.0f}",
            f"{r['peak_rss_kib'] / 1024:.0f}",
        )
    Console(width=140).print(t)
    print(f"copy bandwidth {bw.get('copy_gbs', 0):.1f} GB/s (read + write)")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
