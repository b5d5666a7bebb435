"""Load and fault behaviour of ``einplan serve`` (127.0.0.1 only, bounded).

Starts the server in a subprocess (random weights, byte tokenizer: speed does not depend on
the weights), then with 1, 4 and 16 concurrent streaming clients measures total decode
throughput, time to first token and per-token latency (p50/p99) and errors; then the faults:
a client killed mid-stream, a 10,000-token prompt, malformed JSON, a long prompt beside short
ones (does it block them?); after each, the server must still answer.

    python benchmarks/serve.py --config smollm2-135m --clients 1 4 16 --out results/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def stream_one(url: str, prompt: str, max_tokens: int, kill_after: int | None = None) -> dict:
    """One streaming completion: its TTFT, gaps between chunks, tokens, error."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body.update(ignore_eos=True, logprobs=0)  # a chunk per token, text or not (random weights)
    t0 = time.perf_counter()
    times: list[float] = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                return {"error": f"{r.status_code} {r.read()[:200]!r}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                lp = chunk["choices"][0]["logprobs"]
                times.extend([time.perf_counter()] * len(lp["tokens"] if lp else []))
                if kill_after is not None and len(times) >= kill_after:
                    return {"killed": True, "tokens": len(times)}
    except httpx.HTTPError as e:
        return {"error": repr(e)}
    if not times:
        return {"error": "no tokens"}
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"ttft": times[0] - t0, "gaps": gaps, "tokens": len(times), "end": times[-1]}


def load(url: str, clients: int, requests: int, prompt_tokens: int, max_tokens: int) -> dict:
    """``clients`` threads, each streaming ``requests`` completions one after another."""
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(requests):
            prompt = (f"{i:02d}{j:02d} the quick brown fox jumps " * 20)[:prompt_tokens]
            r = stream_one(url, prompt, max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "wall_s": round(wall, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(pct(ttft, 0.5), 3),
        "ttft_p99_s": round(pct(ttft, 0.99), 3),
        "token_p50_ms": round(pct(gaps, 0.5) * 1e3, 1),
        "token_p99_ms": round(pct(gaps, 0.99) * 1e3, 1),
    }


def healthy(url: str) -> bool:
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=120)
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def faults(url: str, ctx: int) -> dict:
    out: dict = {}
    # a client killed mid-stream: its lane must be freed (running drops back)
    r = stream_one(url, "kill me " * 4, 400, kill_after=3)
    time.sleep(0.5)
    metrics = httpx.get(url + "/metrics").text
    running = [ln for ln in metrics.splitlines() if ln.startswith("einplan_running_requests ")]
    out["killed_client"] = {
        "read_tokens": r.get("tokens"),
        "running_after": float(running[0].split()[1]) if running else None,
        "healthy_after": healthy(url),
    }
    # a 10,000-token prompt (byte tokenizer: 10,000 bytes)
    t0 = time.perf_counter()
    resp = httpx.post(
        url + "/v1/completions", json={"prompt": "a" * 10_000, "max_tokens": 4}, timeout=600
    )
    out["prompt_10000"] = {
        "status": resp.status_code,
        "seconds": round(time.perf_counter() - t0, 2),
        "answer": resp.json().get("error", {}).get("code") or "completed",
        "healthy_after": healthy(url),
    }
    # malformed JSON
    resp = httpx.post(
        url + "/v1/completions", content=b'{"prompt": "x", ', headers={"content-type": "json"}
    )
    out["malformed_json"] = {"status": resp.status_code, "healthy_after": healthy(url)}
    # a long prompt beside short requests: the short ones' TTFT
    long_len = min(ctx - 64, 1500)
    res: dict = {}
    t = threading.Thread(
        target=lambda: res.update(long=stream_one(url, "b" * long_len, 16)), daemon=True
    )
    t.start()
    time.sleep(0.05)
    short = [stream_one(url, f"short prompt number {i}", 8) for i in range(3)]
    t.join()
    out["long_prompt_beside_short"] = {
        "long_prompt_tokens": long_len,
        "long_ttft_s": round(res["long"].get("ttft", float("nan")), 3),
        "short_ttft_s": [round(s.get("ttft", float("nan")), 3) for s in short],
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="smollm2-135m")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--no-faults", action="store_true")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="einplan-serve-bench-"))
    plan = tmp / "model.plan"
    subprocess.run(
        [sys.executable, "-m", "einplan", "compile", args.config, "-o", str(plan)],
        check=True,
        capture_output=True,
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "einplan", "serve", str(plan), "--random-weights", "0"]
    cmd += ["--tokenizer", "bytes", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--max-batch", str(args.max_batch), "--ctx", str(args.ctx)]
    server = subprocess.Popen(cmd, env={**os.environ})
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        healthy(url)  # warm up: prepares the kernels of batch 1
        results: dict = {"config": args.config, "cpus": os.cpu_count(), "load": []}
        for c in args.clients:
            load(url, c, 1, args.prompt_tokens, 4)  # warm up this batch size's kernels
            row = load(url, c, args.requests, args.prompt_tokens, args.max_tokens)
            results["load"].append(row)
            print(json.dumps(row), flush=True)
        base = results["load"][0]["tokens_per_s"]
        for row in results["load"]:
            row["speedup_vs_first"] = round(row["tokens_per_s"] / base, 2)
        if not args.no_faults:
            results["faults"] = faults(url, args.ctx)
            print(json.dumps(results["faults"], indent=1), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
