"""Training benchmark: one optimizer step (forward + backward + AdamW, fp32, random weights)
of SmolLM2-135M at 1x256 and 4x256, and of the tiny Llama PyTorch's reference numbers use,
in tokens/s with forward/backward/optimizer times and peak RSS; optionally interleaved with
PyTorch eager (../shared/perf/peer/torch_baselines.py run by a torch venv's python).

    python benchmarks/train.py                                  # einplan only
    python benchmarks/train.py --torch-python /path/to/torch-venv/bin/python

Every case runs in its own subprocess (peak RSS per case). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, run_torch_case, subprocess_json, timed, write_results  # noqa: E402

# the models of torch_baselines.py: SmolLM2-135M's shape, and its tiny Llama
MODELS = {
    "smollm2-135m": ROOT / "configs" / "smollm2-135m.json",
    "tiny": {
        "name": "tiny-peer",
        "vocab_size": 2048,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}
TRAIN = {"optimizer": "adamw", "weight_decay": 0.01, "grad_clip": 1.0, "beta2": 0.999}


def run_case_here(model: str, batch: int, seq: int, kernels: str, args) -> dict:
    """One einplan case in this process (called in a subprocess by :func:`main`)."""
    import numpy as np

    import einplan
    from einplan.formats.weights import random_weights
    from einplan.models.train_config import parse_train_config
    from einplan.runtime.trainer import Trainer

    cfg = parse_train_config({**TRAIN, "micro_batch": batch, "seq_len": seq, "lr": 1e-4})
    t0 = time.perf_counter()
    plan = einplan.compile_model(MODELS[model], entries=("train_step", "loss"), train=cfg)
    compile_s = time.perf_counter() - t0
    trainer = Trainer(plan, random_weights(plan.entry("train_step"), 0), cfg, kernels=kernels)
    vocab = plan.config["vocab_size"]
    ids = np.random.default_rng(1).integers(1, vocab, (batch, seq + 1))
    stats = []
    samples = timed(lambda: stats.append(trainer.run_step([ids])), args.warmup, args.reps, 0)
    steps = stats[args.warmup :]
    med = statistics.median(samples)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "compile_s": compile_s,
        "samples_s": samples,
        "step_s_median": med,
        "step_s_min": min(samples),
        "tokens_per_s": batch * seq / med,
        "tokens_per_s_best": batch * seq / min(samples),
        "phase_ms_median": {
            k: statistics.median(s.phase_ms[k] for s in steps) for k in steps[0].phase_ms
        },
        "loss_first_last": (stats[0].loss, stats[-1].loss),
        "peak_rss_kib": ru.ru_maxrss,
        "minflt": ru.ru_minflt,
        "kernels": kernels,
    }


def run_ours(model, batch, seq, kernels, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--case",
        f"{model}:{batch}:{seq}:{kernels}",
        "--warmup",
        str(args.warmup),
        "--reps",
        str(args.reps),
    ]
    res = subprocess_json(cmd)
    res.update(engine="einplan", model=model, batch=batch, seq=seq, kernels=kernels)
    return res


def run_torch(model, batch, seq, kernels, args) -> dict:
    res = run_torch_case(
        args.torch_python, f"{model}:train:{batch}:{seq}", args.warmup, args.reps, 0
    )
    res.update(engine="pytorch-eager", model=model, batch=batch, seq=seq)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-python", help="python of a venv with torch 2.13.0 + transformers")
    ap.add_argument(
        "--cases",
        default="smollm2-135m:1:256,smollm2-135m:4:256,tiny:1:256,tiny:4:256",
        help="comma list of model:batch:seq (models: smollm2-135m, tiny)",
    )
    ap.add_argument("--kernels", default="numba", help="einplan's backends, e.g. numpy,numba")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        model, b, s, kernels = args.case.split(":")
        print(json.dumps(run_case_here(model, int(b), int(s), kernels, args)))
        return

    results = []
    for case in args.cases.split(","):
        model, b, s = case.split(":")
        runs = [(run_ours, k) for k in args.kernels.split(",")]
        runs += [(run_torch, "")] if args.torch_python else []
        for run, kernels in runs:  # the engines interleaved, case by case
            r = run(model, int(b), int(s), kernels, args)
            results.append(r)
            print(
                f"{r['engine']} {kernels} {model} {b}x{s}: {r.get('tokens_per_s', 0):.1f} tok/s "
                f"{r.get('error', '')[-300:]}",
                file=sys.stderr,
            )

    from rich.console import Console
    from rich.table import Table

    t = Table(title="train step: forward + backward + AdamW (fp32, random weights, 2 cores)")
    cols = ("engine", "model", "case", "tok/s median", "tok/s best", "fwd/bwd/opt ms")
    for col in (*cols, "peak RSS MiB", "vs PyTorch"):
        t.add_column(col, justify="left" if col in cols[:3] else "right")
    torch_tps = {
        (r["model"], r["batch"], r["seq"]): r["tokens_per_s"]
        for r in results
        if r["engine"] == "pytorch-eager" and "tokens_per_s" in r
    }
    for r in results:
        case = f"{r['batch']}x{r['seq']}"
        if "error" in r:
            t.add_row(r["engine"], r["model"], case, "error", r["error"][-60:], "", "", "")
            continue
        if r["engine"] == "einplan":
            ph = r["phase_ms_median"]
            phases = f"{ph['forward']:.0f}/{ph['backward']:.0f}/{ph['optimizer']:.0f}"
        else:
            phases = "/".join(
                f"{r.get(k, 0) * 1e3:.0f}" for k in ("fwd_s_median", "bwd_s_median", "opt_s_median")
            )
        ref = torch_tps.get((r["model"], r["batch"], r["seq"]))
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref and r["engine"] == "einplan" else ""
        t.add_row(
            f"{r['engine']} ({r['kernels']})" if r.get("kernels") else r["engine"],
            r["model"],
            case,
            f"{r['tokens_per_s']:.1f}",
            f"{r['tokens_per_s_best']:.1f}" if "tokens_per_s_best" in r else "",
            phases,
            f"{r['peak_rss_kib'] / 1024:.0f}",
            ratio,
        )
    Console(width=140).print(t)
    write_results(args.json, results)


if __name__ == "__main__":
    main()
