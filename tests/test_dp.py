"""Data-parallel training (issue #16): shards of a step equal the single process that runs
all their micro-batches (bit for bit when each shard holds one, as the all-reduce adds in rank
order); on Ray, a 2-worker run equals it in losses and weights, rank 0's checkpoint loads, a
killed worker is replaced from the last checkpoint without changing a loss, bad clusters are
named, and a run that started Ray leaves no Ray process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import einplan
from einplan.api import TRAIN_ENTRIES
from einplan.apps.allreduce import chunk_bounds, sum_in_rank_order
from einplan.apps.metrics import read_records
from einplan.cli import main
from einplan.formats.checkpoint import load_checkpoint
from einplan.formats.weights import random_weights
from einplan.models.train_config import TrainConfig
from einplan.runtime.trainer import Shard, Trainer

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "einplan" / "data" / "shakespeare_sample.txt"
TINY = ROOT / "einplan" / "configs" / "tiny.json"
# a short run of the tiny config: the kill test needs a checkpoint before its kill and steps
# after it
SETTINGS = {
    "seq_len": 32,
    "micro_batch": 4,
    "accumulation": 1,
    "warmup_steps": 2,
    "log_every": 1,
    "checkpoint_every": 4,
    "sample_every": 0,
    "eval_batches": 1,
}
STEPS = 16
RAY_PROCESSES = ("raylet", "gcs_server", "ray::", "ray/dashboard", "ray/_private")


def test_chunks_cover_the_buffer_and_sums_keep_rank_order():
    assert chunk_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert chunk_bounds(1, 2) == [(0, 0), (0, 1)]
    parts = [np.array([1e8], np.float32), np.array([1.0], np.float32), np.array([-1e8], np.float32)]
    assert sum_in_rank_order(parts)[0] == np.float32(0)  # (1e8 + 1) - 1e8 in float32
    assert sum_in_rank_order(parts[::-1])[0] == np.float32(0)
    assert sum_in_rank_order([parts[0], parts[2], parts[1]])[0] == np.float32(1)
    assert sum_in_rank_order(parts).dtype == np.float32 and parts[0][0] == np.float32(1e8)


class ThreadAllReduce:
    """An all-reduce between threads (a barrier), adding in rank order as the Ray one does."""

    def __init__(self, size: int) -> None:
        self.barrier, self.rows = threading.Barrier(size), [None] * size

    def for_rank(self, rank: int):
        def all_reduce(buffers, record):
            self.rows[rank] = ([b.copy() for b in buffers], record)
            self.barrier.wait()
            for k, b in enumerate(buffers):
                b[...] = sum_in_rank_order([row[0][k] for row in self.rows])
            records = [row[1] for row in self.rows]  # before a faster rank writes its next row
            self.barrier.wait()
            return records

        return all_reduce


def windows(seed: int, batch: int = 2, seq: int = 16) -> np.ndarray:
    ids = np.frombuffer(CORPUS.read_bytes()[:20000], np.uint8).astype(np.int64)
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq - 1, batch)
    return np.stack([ids[s : s + seq + 1] for s in starts])


@pytest.mark.parametrize("accumulation", [1, 2])
def test_shards_equal_one_process_accumulating_all_their_micro_batches(accumulation):
    from test_train import MICRO, TRAIN

    # plain attention: these shards are threads of one process, and flash attention's kernel
    # caps the process-wide BLAS threads while it runs, which can change the rounding of a
    # product another thread runs at that moment; Ray's workers are processes (tested below
    # with flash)
    plan = einplan.compile_model(MICRO, entries=TRAIN_ENTRIES, attention="plain")
    size = 2
    weights = lambda: random_weights(plan.entry("train_step"), 0)  # noqa: E731
    single = Trainer(plan, weights(), TrainConfig(**{**TRAIN, "accumulation": size * accumulation}))
    steps = [[windows(10 * s + i) for i in range(size * accumulation)] for s in range(4)]
    expected = [single.run_step(batches) for batches in steps]
    cfg = TrainConfig(**{**TRAIN, "accumulation": accumulation})
    shards = [Trainer(plan, weights(), cfg) for _ in range(size)]
    reduce = ThreadAllReduce(size)
    got: list[list] = [[] for _ in range(size)]

    def work(rank):
        shard = Shard(rank, size, reduce.for_rank(rank))
        got[rank] = [shards[rank].run_step(b[rank::size], shard) for b in steps]

    threads = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in range(size):
        assert [s.tokens for s in got[rank]] == [s.tokens for s in expected]
        losses = [s.loss for s in got[rank]]
        norms = [s.grad_norm for s in got[rank]]
        if accumulation == 1:  # rank order is the single process's order: bit for bit
            assert losses == [s.loss for s in expected]
            assert norms == [s.grad_norm for s in expected]
        else:  # the shards' partial sums are added in another order
            np.testing.assert_allclose(losses, [s.loss for s in expected], rtol=1e-6)
            np.testing.assert_allclose(norms, [s.grad_norm for s in expected], rtol=1e-5)
        for key in single.trained:
            a, b = shards[rank].weights[key], single.weights[key]
            if accumulation == 1:
                assert np.array_equal(a, b), key
            else:  # AdamW divides by sqrt(v): a gradient near 0 turns reordering into ~lr/1000
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=key)


def test_dp_without_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    args = ["train", str(TINY), "--data", str(CORPUS), "--out", str(tmp_path / "r"), "--dp", "2"]
    assert main(args) == 2
    assert "pip install 'einplan[ray]'" in capsys.readouterr().err


def test_ray_options_without_dp_are_refused(tmp_path, capsys):
    args = ["train", str(TINY), "--data", str(CORPUS), "--out", str(tmp_path / "r")]
    assert main([*args, "--ray-address", "auto"]) == 2
    assert "go with --dp" in capsys.readouterr().err


# ---- on Ray ----------------------------------------------------------------------------


def ray_processes() -> set[int]:
    """Process ids of Ray's daemons and workers on this machine."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(name in cmdline for name in RAY_PROCESSES):
            found.add(int(entry.name))
    return found


def wait_until(condition, polls: int = 300, every: float = 0.1) -> bool:
    """Poll ``condition`` a bounded number of times."""
    for _ in range(polls):
        if condition():
            return True
        time.sleep(every)
    return condition()


def run_losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_records(out / "metrics.jsonl")]


def final_weights(out: Path) -> dict[str, np.ndarray]:
    return load_checkpoint(out / "checkpoints").tensors("model.safetensors")


@pytest.fixture(scope="module")
def tiny_plan():
    pytest.importorskip("ray.train")
    return einplan.compile_model(TINY, entries=TRAIN_ENTRIES)


@pytest.fixture(scope="module")
def single_run(tiny_plan, tmp_path_factory):
    """One process accumulating both workers' micro-batches: the oracle."""
    out = tmp_path_factory.mktemp("single")
    overrides = {**SETTINGS, "accumulation": 2 * SETTINGS["accumulation"]}
    einplan.train(tiny_plan, data=CORPUS, out=out, steps=STEPS, overrides=overrides)
    return out


@pytest.fixture(scope="module")
def dp_run(tiny_plan, tmp_path_factory):
    """A 2-worker run on a local Ray started (and stopped) for it; the Ray processes that
    were there before it and those left after it."""
    out = tmp_path_factory.mktemp("dp")
    before = ray_processes()
    einplan.train(tiny_plan, data=CORPUS, out=out, steps=STEPS, overrides=SETTINGS, dp=2)
    wait_until(lambda: not (ray_processes() - before))
    return out, ray_processes() - before


def test_two_workers_equal_the_single_process_bit_for_bit(dp_run, single_run):
    out, _ = dp_run
    assert run_losses(out) == run_losses(single_run)
    records = read_records(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["allreduce_ms"] > 0 and 0 < r["allreduce_fraction"] < 1 for r in records)
    assert all([w["rank"] for w in r["workers"]] == [0, 1] for r in records)
    assert all(w["tokens_per_s"] > 0 for r in records for w in r["workers"])
    expected = final_weights(single_run)
    got = final_weights(out)
    assert got.keys() == expected.keys()
    for key, arr in expected.items():
        assert np.array_equal(got[key], arr), key


def test_rank_zero_checkpoint_is_the_usual_folder_and_loads(dp_run, tiny_plan):
    out, _ = dp_run
    root = out / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "step-000008", "step-000012", "step-000016"]  # keep 3, no temps
    ckpt = load_checkpoint(root)  # every file checked against its manifest
    assert ckpt.state["counters"]["step"] == STEPS
    session = einplan.Session(tiny_plan, weights=str(ckpt.path))
    logits = session.forward(windows(0, batch=1, seq=8)[:, :-1])
    assert np.isfinite(logits).all()
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header.endswith("allreduce_ms,allreduce_fraction")
    assert len((out / "metrics.csv").read_text().splitlines()) == STEPS + 1  # one writer


def test_a_run_that_started_ray_leaves_no_ray_process(dp_run):
    _, left = dp_run
    assert not left


def test_a_killed_worker_restarts_the_group_from_the_checkpoint(tiny_plan, single_run, tmp_path):
    out = tmp_path / "killed"
    killed: list[int] = []

    def kill_rank_1_after_a_checkpoint():
        def victim():
            path = out / "metrics.jsonl"
            if not (out / "checkpoints" / "latest").is_symlink() or not path.exists():
                return None
            records = [json.loads(line) for line in path.read_text().splitlines()[:-1]]
            late = [r for r in records if r["step"] > SETTINGS["checkpoint_every"]]
            return late[-1]["workers"][1]["pid"] if late else None

        if wait_until(lambda: victim() is not None, polls=3000, every=0.02):
            killed.append(victim())
            os.kill(killed[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank_1_after_a_checkpoint, daemon=True)
    killer.start()
    einplan.train(tiny_plan, data=CORPUS, out=out, steps=STEPS, overrides=SETTINGS, dp=2)
    killer.join()
    assert killed, "the run ended before a worker could be killed"
    records = read_records(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert killed[0] not in {w["pid"] for w in records[-1]["workers"]}  # a new group
    assert run_losses(out) == run_losses(single_run)
    expected = final_weights(single_run)
    for key, arr in final_weights(out).items():
        assert np.array_equal(arr, expected[key]), key


def test_a_cluster_too_small_or_unreachable_is_named(tmp_path, capsys):
    pytest.importorskip("ray.train")
    args = ["train", str(TINY), "--data", str(CORPUS), "--out", str(tmp_path / "r")]
    assert main([*args, "--dp", "2", "--ray-address", "127.0.0.1:9"]) == 2
    assert "no Ray cluster answers there" in capsys.readouterr().err
    before = ray_processes()
    assert main([*args, "--dp", str((os.cpu_count() or 1) + 1)]) == 2
    err = capsys.readouterr().err
    assert "lower --dp or --threads-per-worker" in err
    assert wait_until(lambda: not (ray_processes() - before))


@pytest.mark.slow
def test_two_node_local_cluster(single_run, tmp_path):
    """``ray start --head`` and a second ``ray start --address``, each with one CPU, and
    ``einplan train --dp 2 --ray-address`` run as a user would (a process of its own, which
    takes the cluster's token mode from the environment): the two workers land on both nodes
    and the run equals the single process."""
    from ray_cluster import local_cluster

    out = tmp_path / "two-node"
    settings = [f"--set={k}={v}" for k, v in SETTINGS.items()]
    with local_cluster(nodes=2, cpus=1) as address:
        args = ["train", str(TINY), "--data", str(CORPUS), "--out", str(out), "--steps", str(STEPS)]
        args += [*settings, "--dp", "2", "--ray-address", address]
        proc = subprocess.run([sys.executable, "-m", "einplan", *args], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    records = read_records(out / "metrics.jsonl")
    assert run_losses(out) == run_losses(single_run)
    assert len({w["pid"] for w in records[-1]["workers"]}) == 2
