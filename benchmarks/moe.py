"""Mixture-of-experts benchmark: einplan against PyTorch eager + transformers on the same
Mixtral-shaped models (random weights), forward tokens/s, train step (forward + backward +
AdamW) tokens/s and greedy decode tokens/s, measured in ONE interleaved run: for every repeat
each case runs once in einplan (this process) and once in a PyTorch worker process (a torch
venv's python running this file with --torch-worker), so both see the same machine load.

    python benchmarks/moe.py --torch-python /work/torch-venv/bin/python
    python benchmarks/moe.py --torch-python ... --models tiny-moe --reps 5

Models: ``tiny-moe`` (hidden 256, 4 layers, 4 experts of 688, top-2) and ``smollm2-moe``
(SmolLM2-135M's attention and vocabulary, 8 experts of 1536, top-2, 4 layers rather than 30
so that a train step with AdamW fits beside the other engine on a small machine). PyTorch uses
transformers' MixtralForCausalLM with its "eager" experts implementation (the fastest on
CPU; the default grouped_mm is slower) and as many threads as einplan's BLAS. Prints a table,
writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = {
    "tiny-moe": {
        "model_type": "mixtral",
        "vocab_size": 2048,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "smollm2-moe": {
        "model_type": "mixtral",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 4,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 1024,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}
# (case, batch, seq): forward and train over batch x seq tokens; decode: `seq` new tokens
# after a 16-token prompt, batch 1
CASES = {
    "tiny-moe": [("forward", 1, 256), ("train", 4, 128), ("decode", 1, 64)],
    "smollm2-moe": [("forward", 1, 256), ("train", 1, 256), ("decode", 1, 64)],
}
PROMPT = 16
LR = 1e-4


def make_ids(vocab: int, batch: int, seq: int, seed: int = 1):
    import numpy as np

    return np.random.default_rng(seed).integers(1, vocab, (batch, seq))


# ------------------------------------------------------------------------------------------
# PyTorch worker (run by a torch venv's python; imports no einplan)
# ------------------------------------------------------------------------------------------


def torch_worker(model: str, threads: int) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = MixtralConfig(**MODELS[model], use_cache=True)
    net = MixtralForCausalLM(cfg).float()
    # the loop over experts: on CPU the fastest of transformers' implementations here (eager
    # ~490 tok/s, grouped_mm ~210, batched_mm ~23 on the tiny forward)
    net.set_experts_implementation("eager")
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.01)
    vocab = cfg.vocab_size

    def forward(batch, seq):
        ids = torch.from_numpy(make_ids(vocab, batch, seq))
        net.eval()
        with torch.no_grad():
            net(ids)

    def train(batch, seq):
        ids = torch.from_numpy(make_ids(vocab, batch, seq + 1))
        net.train()
        out = net(ids[:, :-1], labels=ids[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def decode(batch, new):
        ids = torch.from_numpy(make_ids(vocab, batch, PROMPT))
        net.eval()
        with torch.no_grad():
            net.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )

    fns = {"forward": forward, "train": train, "decode": decode}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.perf_counter()
        fns[req["case"]](req["batch"], req["seq"])
        print(json.dumps({"s": time.perf_counter() - t0}), flush=True)


class TorchPeer:
    """A persistent PyTorch worker process for one model."""

    def __init__(self, python: str, model: str, threads: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error")
        cmd = [python, __file__, "--torch-worker", model, "--threads", str(threads)]
        self.p = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert json.loads(self.p.stdout.readline())["ready"]

    def time(self, case: str, batch: int, seq: int) -> float:
        self.p.stdin.write(json.dumps({"case": case, "batch": batch, "seq": seq}) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())["s"]

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


# ------------------------------------------------------------------------------------------
# einplan (this process)
# ------------------------------------------------------------------------------------------


class Ours:
    """einplan's plan, weights, trainer and generator for one model."""

    def __init__(
        self, model: str, workers: int, kernels: str | None = None, all_blas_threads: bool = False
    ) -> None:
        import einplan
        from einplan.formats.weights import random_weights
        from einplan.models.train_config import parse_train_config
        from einplan.runtime.generate import Generator
        from einplan.runtime.trainer import Trainer

        raw = {**MODELS[model], "max_batch": 8}
        cases = CASES[model]
        batch, seq = next((b, s) for c, b, s in cases if c == "train")
        settings = {"optimizer": "adamw", "weight_decay": 0.01, "grad_clip": 1.0, "lr": LR}
        tc = parse_train_config({**settings, "micro_batch": batch, "seq_len": seq})
        t0 = time.perf_counter()
        entries = ("train_step", "loss", "forward", "prefill", "decode")
        self.plan = einplan.compile_model(raw, entries=entries, train=tc)
        self.compile_s = time.perf_counter() - t0
        if all_blas_threads:  # measure without the schedule pass's one-thread rule
            for graph in self.plan.entries.values():
                graph.meta.get("schedule", {})["blas_threads"] = None
        self.session = einplan.Session(self.plan, random_seed=0, workers=workers, kernels=kernels)
        weights = random_weights(self.plan.entry("train_step"), 0)
        self.trainer = Trainer(self.plan, weights, tc, workers=workers, kernels=kernels)
        self.gen = Generator(self.plan, self.session.weights, workers, kernels=kernels)
        self.vocab = raw["vocab_size"]

    def time(self, case: str, batch: int, seq: int) -> float:
        from einplan.runtime.generate import GenerationRequest
        from einplan.runtime.sampling import SamplingConfig

        t0 = time.perf_counter()
        if case == "forward":
            self.session.forward(make_ids(self.vocab, batch, seq))
        elif case == "train":
            self.trainer.run_step([make_ids(self.vocab, batch, seq + 1)])
        else:
            prompt = make_ids(self.vocab, batch, PROMPT).tolist()
            self.gen.generate(GenerationRequest(prompt, seq, SamplingConfig()))
        return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch-python", help="python of a venv with torch and transformers")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="einplan thread-pool workers")
    ap.add_argument("--kernels", help="einplan's kernels backend (default: the fastest installed)")
    ap.add_argument(
        "--also-kernels",
        nargs="*",
        default=[],
        help="more einplan engines on these kernels backends, interleaved with the others",
    )
    ap.add_argument(
        "--all-blas-threads",
        action="store_true",
        help="einplan's products on every BLAS thread even in a plan of small products "
        "(overrides the schedule pass's one-thread rule, to measure its effect)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe.json"))
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_worker:
        torch_worker(args.torch_worker, args.threads)
        return 0
    results = []
    load_before = os.getloadavg()
    for model in args.models:
        engines = [("einplan", Ours(model, args.workers, args.kernels, args.all_blas_threads))]
        for k in args.also_kernels:
            engines.append((f"einplan_{k}", Ours(model, args.workers, k, args.all_blas_threads)))
        if args.torch_python:
            engines.append(("pytorch", TorchPeer(args.torch_python, model, args.threads)))
        samples: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.warmup + args.reps):
            for case, batch, seq in CASES[model]:
                for engine, runner in engines:
                    s = runner.time(case, batch, seq)
                    if rep >= args.warmup:
                        samples.setdefault((case, engine), []).append(s)
        if args.torch_python:
            engines[-1][1].close()
        for case, batch, seq in CASES[model]:
            tokens = batch * seq
            row = {"model": model, "case": case, "batch": batch, "seq": seq}
            for engine, _ in engines:
                if (case, engine) in samples:
                    med = statistics.median(samples[(case, engine)])
                    row[f"{engine}_s"] = med
                    row[f"{engine}_tok_s"] = tokens / med
            if "pytorch_s" in row:
                row["speedup"] = row["pytorch_s"] / row["einplan_s"]
            results.append(row)
            rates = "  ".join(f"{e} {row[f'{e}_tok_s']:9,.0f} tok/s" for e, _ in engines)
            speedup = f"  speedup {row['speedup']:.2f}x" if "speedup" in row else ""
            print(f"{model:12s} {case:8s} {batch}x{seq:<4d} {rates}{speedup}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "cpus": os.cpu_count()}
    meta["load_avg_before_after"] = [load_before, os.getloadavg()]
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
