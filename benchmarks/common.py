"""What the benchmarks share: timing loops, per-case subprocesses, the PyTorch peer, output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

try:  # before numpy: einplan sets OpenBLAS's thread timeout (einplan/__init__.py)
    import einplan  # noqa: F401
except ModuleNotFoundError:  # the PyTorch side's venv has no einplan
    pass

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "perf" / "peer" / "torch_baselines.py"


def timed(fn, warmup: int, reps: int, min_time: float) -> list[float]:
    """Run ``fn`` warmup times, then at least ``reps`` times and ``min_time`` seconds."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    t_end = time.perf_counter() + min_time
    while len(samples) < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def subprocess_json(cmd: list[str], env: dict | None = None) -> dict:
    """Run a case in its own process (peak RSS per case); its last stdout line is JSON."""
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": p.stderr.strip()[-1500:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_torch_case(torch_python: str, case: str, warmup: int, reps: int, min_time: float) -> dict:
    """One case of ../shared/perf/peer/torch_baselines.py (``smollm2-135m:fwd:1:256``)."""
    cmd = [
        torch_python,
        str(PEER),
        "--case",
        case,
        "--threads",
        "2",
        "--warmup",
        str(warmup),
        "--reps",
        str(reps),
        "--min-time",
        str(min_time),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    res = subprocess_json(cmd, env)
    res["engine"] = "pytorch-eager"
    return res


def peak_rss_kib() -> int:
    """Peak resident memory of this process so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def write_results(path: str, results: list[dict]) -> None:
    """Write the run's results with the machine it ran on."""
    import numpy

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "argv": sys.argv,
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out}")
