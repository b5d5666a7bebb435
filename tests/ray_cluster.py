"""A Ray cluster of several nodes on this machine (``ray start --head`` plus ``ray start
--address`` per extra node, each with its own CPUs), for tests/test_dp.py's slow test and
benchmarks/dp.py. Its processes are found in the process tree of the ``ray start`` commands and
stopped by their ids."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

COUNT_NODES = (
    "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
    "print(sum(1 for n in ray.nodes() if n['Alive']))"
)


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    """The ``ray`` command of this Python's environment."""
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def descendants(roots: list[int]) -> set[int]:
    """Ids of the processes below ``roots`` in the process tree (Ray renames its processes,
    and they outlive their parents, so they are found this way before stopping them)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), set(roots)
    while frontier:
        found |= frontier
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
    return found - set(roots)


def alive_nodes(address: str, head: subprocess.Popen) -> int:
    """How many nodes the cluster at ``address`` has (0 when it does not answer yet)."""
    if head.poll() is not None:
        raise RuntimeError(f"`ray start --head` exited with status {head.returncode}")
    cmd = [sys.executable, "-c", COUNT_NODES, address]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return 0
    return int(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout else 0


@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus: int = 1) -> Iterator[str]:
    """Start a head and ``nodes - 1`` more nodes of ``cpus`` CPUs each; yield the head's
    address; stop every process of the cluster (by id) on the way out."""
    # a short folder: Ray's socket paths inside it must stay under 108 bytes
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    # `ray start` turns token authentication on: its nodes and drivers (this process's
    # children and this process) must ask for it too
    auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = [f"--num-cpus={cpus}", "--disable-usage-stats", "--block"]
    head = [ray_cli(), "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}"]
    started = [subprocess.Popen([*head, "--include-dashboard=false", *common])]
    try:
        for _ in range(120):
            if alive_nodes(address, started[0]) >= 1:
                break
            time.sleep(0.5)
        for _ in range(nodes - 1):
            started.append(subprocess.Popen([ray_cli(), "start", f"--address={address}", *common]))
        for _ in range(120):
            if alive_nodes(address, started[0]) >= nodes:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the {nodes}-node Ray cluster at {address} did not come up")
        yield address
    finally:
        tree = descendants([p.pid for p in started])
        for p in reversed(started):
            p.send_signal(signal.SIGTERM)
        for p in started:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for pid in tree:  # what `ray start` left running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth
