"""einplan on one CUDA GPU (issue #18): SmolLM2-135M's shape with random weights, float32,
each case with CUDA graph replay, without it (``--no-cuda-graph``) and with TF32 products.

    python benchmarks/gpu.py [--out benchmarks/results/gpu-h200.json] [--torch TORCH.json]

Cases: decode batch 1 (32-token prompt, 64 new tokens, greedy; tokens/s at the median step),
forward 1x256 (logits copied back to the host included), train step 4x256 and 16x1024
(AdamW; forward, backward, update and the loss read back). ``--torch`` is the JSON written by
../shared/perf/peer/torch_gpu_baselines.py in the same device call: its numbers are put beside
ours as ratios. Also measured: the GPU's float32/TF32 GEMM peak and bandwidth (``einplan bench
machine --device cuda``) and the cost per kernel of a replayed CUDA graph, from which the
decode step's launch floor and bandwidth floor follow.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, timed, write_results  # noqa: E402

CONFIG = ROOT / "configs" / "smollm2-135m.json"
TRAIN = {"optimizer": "adamw", "weight_decay": 0.01, "grad_clip": 1.0, "beta2": 0.999}
VARIANTS = {  # name: (cuda_graph, tf32)
    "graph": (True, False),
    "eager": (False, False),
    "graph-tf32": (True, True),
}
TORCH_KEYS = {
    "decode b1": ["decode fp32 b1 generate", "decode bf16 b1 generate static-cache"],
    "forward 1x256": ["forward fp32 1x256"],
    "train 4x256": ["train fp32 4x256"],
    "train 16x1024": ["train fp32 16x1024", "train bf16-autocast 16x1024"],
}


def sync() -> None:
    import cupy

    cupy.cuda.Device().synchronize()


def graph_us_per_kernel(n: int = 600, reps: int = 50) -> float:
    """Microseconds per kernel of a replayed CUDA graph of ``n`` tiny dependent kernels (the
    launch floor a decode step of that many steps cannot beat)."""
    import cupy as cp

    x = cp.ones((1, 576), cp.float32)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        for _ in range(2):  # fill the memory pool so that capture allocates nothing
            y = x
            for _ in range(n):
                y = y * 1.0001
        s.begin_capture()
        y = x
        for _ in range(n):
            y = y * 1.0001
        g = s.end_capture()
    g.launch(s)
    s.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        g.launch(s)
    s.synchronize()
    return (time.perf_counter() - t0) / reps / n * 1e6


def decode_case(plan, variant: str, reps: int) -> dict:
    import numpy as np

    import einplan

    graph, tf32 = VARIANTS[variant]
    session = einplan.Session(plan, random_seed=0, device="cuda", cuda_graph=graph, tf32=tf32)
    prompt = np.random.default_rng(1).integers(1, plan.config["vocab_size"], 32).tolist()
    gen = session.generate([prompt], 64, ignore_eos=True)  # warm-up: kernels, graphs
    rates, ttft = [], []
    for _ in range(reps):
        gen = session.generate([prompt], 64, ignore_eos=True)
        rates.append(gen.stats.decode_tokens_per_s)
        ttft.append(gen.stats.ttft_s * 1e3)
    dec = session.generator.bind(1, 96)[1]
    steps = sum(dec.steps_by_backend().values())
    return {
        "graph_replay_ms": replay_ms(dec),
        "tok_s": statistics.median(rates),
        "tok_s_samples": rates,
        "ttft_ms": statistics.median(ttft),
        "decode_ms_p50": gen.stats.decode_ms(0.5),
        "decode_ms_p99": gen.stats.decode_ms(0.99),
        "steps_per_token": steps,
        "weights_bytes": gen.stats.weights_bytes,
        "tokens": gen.tokens[0][:8],
    }


def replay_ms(executor, reps: int = 200) -> float | None:
    """Device time of one replay of the graph an executor captured last (None: no graph)."""
    import cupy

    from einplan.runtime.device import device_stream

    state = next(reversed(executor._prepared.values())).device_state
    if state is None or state.graph is None:
        return None
    s = device_stream()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    state.graph.launch(s)
    start.record(s)
    for _ in range(reps):
        state.graph.launch(s)
    end.record(s)
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / reps


def forward_case(plan, variant: str, reps: int) -> dict:
    import numpy as np

    import einplan

    graph, tf32 = VARIANTS[variant]
    session = einplan.Session(plan, random_seed=0, device="cuda", cuda_graph=graph, tf32=tf32)
    ids = np.random.default_rng(1).integers(1, plan.config["vocab_size"], (1, 256))
    samples = timed(lambda: session.forward(ids), 3, reps, 0)
    med = statistics.median(samples)
    graph_ms = replay_ms(session.executor)
    return {"tok_s": 256 / med, "ms": med * 1e3, "samples_s": samples, "graph_replay_ms": graph_ms}


def train_case(plan, cfg, batch: int, seq: int, variant: str, reps: int) -> dict:
    import numpy as np

    from einplan.formats.weights import random_weights
    from einplan.runtime.backends import get_backend
    from einplan.runtime.trainer import Trainer

    graph, tf32 = VARIANTS[variant]
    backend = get_backend(None, "cuda", graph, tf32)
    trainer = Trainer(plan, random_weights(plan.entry("train_step"), 0), cfg, kernels=backend)
    ids = np.random.default_rng(1).integers(1, plan.config["vocab_size"], (batch, seq + 1))
    stats = []
    samples = timed(lambda: stats.append(trainer.run_step([ids])), 2, reps, 0)
    med = statistics.median(samples)
    out = {
        "tok_s": batch * seq / med,
        "step_ms": med * 1e3,
        "samples_s": samples,
        "loss_first_last": (stats[0].loss, stats[-1].loss),
    }
    return out


def profile_case(plan, cfg, batch: int, seq: int) -> dict:
    """Device milliseconds per (op, role) of one train step, timed by CUDA events per step
    (steps launched one by one: launch gaps count), largest first."""
    import numpy as np

    from einplan.api import Recorder
    from einplan.formats.weights import random_weights
    from einplan.runtime.backends import get_backend
    from einplan.runtime.trainer import Trainer

    trainer = Trainer(
        plan, random_weights(plan.entry("train_step"), 0), cfg, kernels=get_backend(None, "cuda")
    )
    ids = np.random.default_rng(1).integers(1, plan.config["vocab_size"], (batch, seq + 1))
    trainer.run_step([ids])
    trainer.profile = Recorder()
    trainer.run_step([ids])
    cost: dict[str, float] = {}
    for r in trainer.profile.records():
        key = f"{r.op} {r.name.split('-')[0]}"
        cost[key] = cost.get(key, 0.0) + r.dur_ns / 1e6
    return dict(sorted(cost.items(), key=lambda kv: -kv[1]))


SMOL = {  # ../shared/perf/peer/torch_gpu_baselines.py's model
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


def torch_tf32_train(batch: int, seq: int, reps: int) -> dict:
    """PyTorch eager float32 training with TF32 products (``allow_tf32``): the peer script's
    model (transformers, sdpa) and step (fused AdamW), timed by CUDA events."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOL, attn_implementation="sdpa")).to("cuda")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = torch.randint(0, SMOL["vocab_size"], (batch, seq), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        step()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return {"tok_s": batch * seq / seconds, "step_ms": seconds * 1e3}


def free_device_memory() -> None:
    """Give the memory of the sessions and trainers dropped so far back to the device."""
    import gc

    import cupy

    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu-h200.json"))
    ap.add_argument("--torch", help="torch_gpu_baselines.py's JSON from the same machine")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--cases",
        default="machine,decode,forward,train",
        help="comma-separated: machine, decode, forward, train, profile (a train step by op), "
        "torch-tf32 (PyTorch's train step with TF32, needs torch)",
    )
    args = ap.parse_args()

    import einplan
    from einplan.models.train_config import parse_train_config
    from einplan.report.machine import measure_machine

    wanted = args.cases.split(",")
    results: dict = {}
    if "machine" in wanted:
        results["machine"] = measure_machine(8192, 2048, 5, "cuda")
        results["machine"]["graph_us_per_kernel"] = graph_us_per_kernel()
        print("machine", json.dumps(results["machine"]), flush=True)
    plan = einplan.compile_model(CONFIG)
    for variant in VARIANTS:
        if "decode" in wanted:
            results[f"decode b1 {variant}"] = decode_case(plan, variant, args.reps)
            print(f"decode b1 {variant}", json.dumps(results[f"decode b1 {variant}"]), flush=True)
        if "forward" in wanted:
            results[f"forward 1x256 {variant}"] = forward_case(plan, variant, args.reps)
            print(f"forward 1x256 {variant}", results[f"forward 1x256 {variant}"], flush=True)
    cfg = parse_train_config({**TRAIN, "micro_batch": 16, "seq_len": 1024, "lr": 1e-4})
    train_plan = einplan.compile_model(CONFIG, entries=("train_step", "loss"), train=cfg)
    if "profile" in wanted:
        results["profile train 16x1024 ms"] = prof = profile_case(train_plan, cfg, 16, 1024)
        free_device_memory()
        print(f"train step 16x1024 by op: {sum(prof.values()):.1f} ms")
        for key, ms in list(prof.items())[:30]:
            print(f"  {key:<40} {ms:8.2f}")
    if "train" in wanted:
        for batch, seq in ((4, 256), (16, 1024)):
            for variant in VARIANTS:
                key = f"train {batch}x{seq} {variant}"
                results[key] = train_case(train_plan, cfg, batch, seq, variant, args.reps)
                free_device_memory()
                print(key, json.dumps(results[key]), flush=True)
    torch = json.loads(Path(args.torch).read_text()) if args.torch else {}
    if "torch-tf32" in wanted:
        free_device_memory()
        torch["train fp32-tf32 16x1024"] = torch_tf32_train(16, 1024, 10)
        print("torch train fp32-tf32 16x1024", torch["train fp32-tf32 16x1024"], flush=True)
    results["torch"] = {k: v for k, v in torch.items() if isinstance(v, dict)}
    rows = []
    for key, r in results.items():
        if key in ("machine", "torch") or key.startswith("profile"):
            continue
        case = " ".join(key.split()[:2])
        names = list(TORCH_KEYS.get(case, []))
        if case == "train 16x1024" and "tf32" in key:
            names.append("train fp32-tf32 16x1024")
        peers = {t: torch[t]["tok_s"] for t in names if "tok_s" in torch.get(t, {})}
        r["vs_torch"] = {t: r["tok_s"] / v for t, v in peers.items()}
        rows.append((key, r["tok_s"], r["vs_torch"]))
    m = results.get("machine")
    d = results.get("decode b1 graph")
    if m and d:
        floor_ms = d["steps_per_token"] * m["graph_us_per_kernel"] / 1e3
        bw_ms = d["weights_bytes"] / (m["bandwidth_gbs"] * 1e9) * 1e3
        d["launch_floor_ms"], d["bandwidth_floor_ms"] = floor_ms, bw_ms
        d["share_of_launch_floor"] = floor_ms / d["decode_ms_p50"]
        d["share_of_bandwidth_floor"] = bw_ms / d["decode_ms_p50"]
    write_results(args.out, [results])
    print(f"\n{'case':<28} {'tok/s':>10}  vs PyTorch (same call)")
    for key, tok_s, vs in rows:
        ratios = ", ".join(f"{v:.2f}x {t}" for t, v in vs.items())
        print(f"{key:<28} {tok_s:10,.0f}  {ratios}")
    if m:
        print(
            f"GPU: fp32 GEMM {m['gemm_gflops'] / 1e3:.1f} TFLOP/s, TF32 "
            f"{m['gemm_tf32_gflops'] / 1e3:.1f} TFLOP/s, copy {m['bandwidth_gbs']:.0f} GB/s, "
            f"graph replay {m['graph_us_per_kernel']:.2f} us/kernel"
        )
    if m and d:
        print(
            f"decode step p50 {d['decode_ms_p50']:.3f} ms: launch floor "
            f"{d['launch_floor_ms']:.3f} ms ({d['steps_per_token']} kernels), bandwidth floor "
            f"{d['bandwidth_floor_ms']:.3f} ms"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
