"""Memory benchmark: peak memory and tokens/s against sequence length (batch 1) for the
forward pass and the train step (forward + backward + AdamW) of SmolLM2-135M (random
weights), einplan with each memory technique on and off beside PyTorch eager (SDPA;
torch.utils.checkpoint; CPU autocast bf16) in the same run.

    python benchmarks/memory.py --torch-python /work/torch-venv/bin/python
    python benchmarks/memory.py --quick                         # smoke run, short lengths
    python benchmarks/memory.py --modes train --lengths 2048 --rows einplan,einplan-layers

Every point (engine row, mode, length) runs in a fresh subprocess and reports its peak RSS
(``getrusage`` maxrss, the same for both engines) and median step time; the rows of the two
engines are interleaved point by point. An einplan row whose option the compiler rejects (flash
attention and bf16 before their branches land) is skipped with the reason. Prints a table,
writes benchmarks/results/memory.json and plots docs/memory.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, timed, write_results  # noqa: E402

CONFIG = ROOT / "configs" / "smollm2-135m.json"
TRAIN = {"optimizer": "adamw", "weight_decay": 0.01, "grad_clip": 1.0, "beta2": 0.999, "lr": 1e-4}
LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
QUICK_LENGTHS = (128, 256)
MODES = ("fwd", "train")

# einplan rows: compile_model keyword arguments, one line per technique
EINPLAN_ROWS: dict[str, dict] = {
    "einplan": {},  # attention auto: flash attention, tiled from 256 keys
    "einplan-plain": {"attention": "plain"},  # the scores -> softmax -> context chain
    "einplan-layers": {"checkpoint": "layers"},
    # the numpy backend: no numba runtime in the process (its import and compiled kernels
    # are about 125 MiB of resident memory)
    "einplan-layers-numpy": {"checkpoint": "layers", "kernels": "numpy"},
    "einplan-numpy": {"kernels": "numpy"},  # the forward without panels or compiled kernels
    "einplan-every:2": {"checkpoint": "every:2"},
    "einplan-selective": {"checkpoint": "selective"},
    "einplan-flash": {"attention": "flash"},
    "einplan-bf16": {"compute_dtype": "bf16"},
    "einplan-flash+layers+bf16": {
        "attention": "flash",
        "checkpoint": "layers",
        "compute_dtype": "bf16",
    },
}
# PyTorch rows: what the train step or forward wraps
TORCH_ROWS: dict[str, dict] = {
    "torch": {},
    "torch-checkpoint": {"checkpoint": True},  # torch.utils.checkpoint per decoder layer
    "torch-bf16": {"autocast": True},  # torch.autocast("cpu", torch.bfloat16)
}
CHECKPOINT_ONLY = ("checkpoint",)  # options that change nothing in a forward pass


def peak_rss_mib() -> float:
    """This process's peak resident memory (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def einplan_point(row: str, mode: str, seq: int, warmup: int, reps: int) -> dict:
    """One einplan point in this process: compile, bind random weights, time the step."""
    import numpy as np

    import einplan
    from einplan.formats.weights import random_weights
    from einplan.models.train_config import parse_train_config
    from einplan.runtime.backends import get_backend
    from einplan.runtime.executor import Executor
    from einplan.runtime.trainer import Trainer

    kwargs = dict(EINPLAN_ROWS[row])
    kernels = kwargs.pop("kernels", None)  # a run option, not a compile one
    cfg = parse_train_config({**TRAIN, "micro_batch": 1, "seq_len": seq})
    ids = np.random.default_rng(1).integers(1, 49152, (1, seq + 1))
    t0 = time.perf_counter()
    if mode == "train":
        plan = einplan.compile_model(CONFIG, entries=("train_step", "loss"), train=cfg, **kwargs)
        trainer = Trainer(plan, random_weights(plan.entry("train_step"), 0), cfg, kernels=kernels)
        compile_s = time.perf_counter() - t0
        samples = timed(lambda: trainer.run_step([ids]), warmup, reps, 0)
        graph, arena = plan.entry("train_step"), trainer.executor.activation_bytes()
    else:
        plan = einplan.compile_model(CONFIG, entries=("forward",), **kwargs)
        graph = plan.entry("forward")
        # as Session binds them: the numba backend holds the projections as panels
        weights = get_backend(kernels).pack_weights(plan, random_weights(graph, 0))
        ex = Executor(graph, weights, kernels=kernels)
        compile_s = time.perf_counter() - t0
        feed = {"tokens": ids[:, :seq], "positions": np.arange(seq)[None, :]}
        samples = timed(lambda: ex.run(feed), warmup, reps, 0)
        arena = ex.activation_bytes()
    from einplan.compiler.passes.memory import estimate_memory

    est = estimate_memory(graph, {"batch": 1, "seq": seq})
    return {
        "compile_s": compile_s,
        "samples_s": samples,
        "estimated_peak_mib": est["peak_bytes"] / 2**20,
        "estimated_arena_mib": est["arena_bytes"] / 2**20,
        "runtime_arena_mib": arena / 2**20,
    }


def interleaved_cost(rows: list[str], seq: int, warmup: int, reps: int) -> list[dict]:
    """Train steps of several einplan rows alternated in one process (A B A B ...), so the
    host's load falls on each alike: the time a technique costs, not its memory."""
    import numpy as np

    import einplan
    from einplan.formats.weights import random_weights
    from einplan.models.train_config import parse_train_config
    from einplan.runtime.trainer import Trainer

    cfg = parse_train_config({**TRAIN, "micro_batch": 1, "seq_len": seq})
    ids = np.random.default_rng(1).integers(1, 49152, (1, seq + 1))
    trainers = {}
    for row in rows:
        kwargs = dict(EINPLAN_ROWS[row])
        kernels = kwargs.pop("kernels", None)
        plan = einplan.compile_model(CONFIG, entries=("train_step", "loss"), train=cfg, **kwargs)
        weights = random_weights(plan.entry("train_step"), 0)
        trainers[row] = Trainer(plan, weights, cfg, kernels=kernels)
    samples: dict[str, list[float]] = {row: [] for row in rows}
    for k in range(warmup + reps):
        for row, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.run_step([ids])
            if k >= warmup:
                samples[row].append(time.perf_counter() - t0)
    base = statistics.median(samples[rows[0]])
    return [
        {
            "engine": "einplan",
            "row": row,
            "mode": "train-interleaved",
            "seq": seq,
            "samples_s": s,
            "step_s_median": statistics.median(s),
            "tokens_per_s": seq / statistics.median(s),
            f"time_vs_{rows[0]}": statistics.median(s) / base,
        }
        for row, s in samples.items()
    ]


def torch_point(row: str, mode: str, seq: int, warmup: int, reps: int) -> dict:
    """One PyTorch eager point in this process (run by the torch venv's python)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    raw = json.loads(CONFIG.read_text())
    cfg = LlamaConfig(**{k: v for k, v in raw.items() if k != "torch_dtype"})
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).float()
    opts = TORCH_ROWS[row]
    ids = torch.randint(1, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))

    def autocast():
        if opts.get("autocast"):
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if mode == "train":
        model.train()
        if opts.get("checkpoint"):
            model.gradient_checkpointing_enable({"use_reentrant": False})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                model(input_ids=ids, use_cache=False)

    return {"samples_s": timed(step, warmup, reps, 0), "torch": torch.__version__}


def run_point(engine: str, row: str, mode: str, seq: int, args) -> dict:
    """A point in a fresh subprocess (its own peak RSS), its address space capped at the
    memory available now (less 1 GiB): a point too large fails alone, never the host."""
    python = sys.executable if engine == "einplan" else args.torch_python
    limit = args.mem_limit_gib or max(1.0, available_gib() - 1)
    cmd = [python, __file__, "--point", f"{engine}|{row}|{mode}|{seq}"]
    cmd += ["--warmup", str(args.warmup), "--reps", str(args.reps), "--mem-limit-gib", str(limit)]
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["TQDM_DISABLE"] = "1"
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode == 0:
        res = json.loads(p.stdout.strip().splitlines()[-1])
    else:
        lines = [ln for ln in p.stderr.replace("\r", "\n").splitlines() if "it/s" not in ln]
        lines = [ln for ln in lines if ln.strip() and "param/s" not in ln]
        res = {"error": f"exit {p.returncode}, limit {limit:.1f} GiB: " + " | ".join(lines[-3:])}
    res.update(engine=engine, row=row, mode=mode, seq=seq, wall_s=time.perf_counter() - t0)
    if "samples_s" in res:
        res["step_s_median"] = statistics.median(res["samples_s"])
        res["tokens_per_s"] = seq / res["step_s_median"]
    return res


def available_gib() -> float:
    """MemAvailable of this host now."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 16.0


def rejected(kwargs: dict) -> str | None:
    """Why the compiler rejects a row's options (checked on the tiny config), or None."""
    import einplan
    from einplan.errors import EinplanError

    kwargs = {k: v for k, v in kwargs.items() if k != "kernels"}  # a run option
    try:
        einplan.compile_model("tiny", entries=("train_step", "loss"), **kwargs)
    except (TypeError, EinplanError) as e:
        return str(e).splitlines()[0]
    return None


def point_json(spec: str, args) -> None:
    """Run the point ``engine|row|mode|seq`` here and print its JSON line."""
    engine, row, mode, seq = spec.split("|")
    if args.mem_limit_gib:  # a point that outgrows it fails alone instead of starving the host
        limit = int(args.mem_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with contextlib.suppress(OSError):  # and if the host runs out, the kernel kills it first
        Path("/proc/self/oom_score_adj").write_text("1000")
    fn = einplan_point if engine == "einplan" else torch_point
    res = fn(row, mode, int(seq), args.warmup, args.reps)
    res["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(res))


def rows_for(mode: str, wanted: set[str] | None, args) -> list[tuple[str, str]]:
    """(engine, row) pairs run for ``mode``: checkpointing rows only for the train step."""
    out = []
    for row, kwargs in EINPLAN_ROWS.items():
        if mode == "fwd" and any(k in CHECKPOINT_ONLY for k in kwargs):
            continue
        out.append(("einplan", row))
    if args.torch_python:
        for row, opts in TORCH_ROWS.items():
            if mode == "fwd" and opts.get("checkpoint"):
                continue
            out.append(("torch", row))
    return [(e, r) for e, r in out if wanted is None or r in wanted]


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="SmolLM2-135M, batch 1, random weights, 2 threads: peak RSS and speed")
    for col in ("mode", "seq", "row", "tok/s", "step s", "peak RSS MiB", "est. peak MiB"):
        t.add_column(col, justify="right" if col not in ("mode", "row") else "left")
    for r in results:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or r["error"].splitlines()[-1]
            t.add_row(r["mode"], str(r["seq"]), r["row"], "-", "-", "-", why[:70])
            continue
        est = r.get("estimated_peak_mib")
        t.add_row(
            r["mode"],
            str(r["seq"]),
            r["row"],
            f"{r['tokens_per_s']:,.1f}",
            f"{r['step_s_median']:.2f}",
            f"{r['peak_rss_mib']:,.0f}",
            f"{est:,.0f}" if est is not None else "",
        )
    Console(width=140).print(t)


def plot(results: list[dict], path: Path) -> None:
    """Peak RSS and tokens/s against length, one panel each per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in results}, key=MODES.index)
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
    for j, mode in enumerate(modes):
        rows = sorted({r["row"] for r in results if r["mode"] == mode})
        for row in rows:
            pts = sorted(
                (r["seq"], r["peak_rss_mib"], r["tokens_per_s"])
                for r in results
                if r["mode"] == mode and r["row"] == row and "tokens_per_s" in r
            )
            if not pts:
                continue
            style = "--" if row.startswith("torch") else "-"
            seqs = [p[0] for p in pts]
            axes[0][j].plot(seqs, [p[1] / 1024 for p in pts], style, marker="o", label=row)
            axes[1][j].plot(seqs, [p[2] for p in pts], style, marker="o", label=row)
        name = "train step" if mode == "train" else "forward"
        axes[0][j].set_title(f"{name}: peak RSS")
        axes[0][j].set_ylabel("GiB")
        axes[1][j].set_title(f"{name}: tokens/s")
        axes[1][j].set_ylabel("tokens/s")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length (batch 1)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-python", help="python of a venv with torch + transformers")
    ap.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}, 1 rep")
    ap.add_argument("--lengths", help="comma list of sequence lengths (default 256 ... 8192)")
    ap.add_argument("--modes", default="fwd,train", help="fwd, train or both")
    ap.add_argument("--rows", help="comma list of rows to run (default: all)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument(
        "--mem-limit-gib",
        type=float,
        help="address-space limit of each point (default: the memory available, less 1 GiB)",
    )
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "memory.png"))
    ap.add_argument(
        "--from-json",
        nargs="+",
        metavar="FILE",
        help="no run: table, JSON and plot of the results of earlier runs (merged)",
    )
    ap.add_argument(
        "--interleave",
        metavar="ROWS",
        help="time only: train steps of these einplan rows (comma list, the first the base) "
        "alternated in one process at each --lengths",
    )
    ap.add_argument("--point", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point:
        point_json(args.point, args)
        return
    if args.interleave:
        results = []
        for seq in [int(x) for x in (args.lengths or "1024").split(",")]:
            for r in interleaved_cost(args.interleave.split(","), seq, args.warmup, args.reps):
                results.append(r)
                print(
                    f"{r['row']} 1x{seq}: median {r['step_s_median']:.2f} s "
                    f"({', '.join(f'{x:.2f}' for x in r['samples_s'])}), "
                    f"{r[next(k for k in r if k.startswith('time_vs_'))]:.2f}x the first row"
                )
        write_results(args.json, results)
        return
    if args.from_json:
        results = [r for f in args.from_json for r in json.loads(Path(f).read_text())["results"]]
        print_table(results)
        write_results(args.json, results)
        plot(results, Path(args.png))
        return
    if args.quick:
        args.reps, args.warmup = 1, 0
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    lengths = lengths or list(QUICK_LENGTHS if args.quick else LENGTHS)
    wanted = set(args.rows.split(",")) if args.rows else None
    skip = {row: rejected(kw) for row, kw in EINPLAN_ROWS.items() if kw}
    for row, why in skip.items():
        if why:
            print(f"skipping {row}: the compiler rejects {EINPLAN_ROWS[row]}: {why}")
    results = []
    for mode in args.modes.split(","):
        for seq in lengths:
            for engine, row in rows_for(mode, wanted, args):  # engines interleaved per point
                if skip.get(row):
                    results.append(
                        {
                            "engine": engine,
                            "row": row,
                            "mode": mode,
                            "seq": seq,
                            "skipped": skip[row],
                        }
                    )
                    continue
                r = run_point(engine, row, mode, seq, args)
                results.append(r)
                got = (
                    f"{r['tokens_per_s']:.1f} tok/s, peak {r['peak_rss_mib']:,.0f} MiB"
                    if "tokens_per_s" in r
                    else r.get("error", "")[-300:]
                )
                print(f"{mode} {seq} {row}: {got}", file=sys.stderr, flush=True)
    print_table(results)
    write_results(args.json, results)
    plot(results, Path(args.png))


if __name__ == "__main__":
    main()
