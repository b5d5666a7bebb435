"""Whether this machine is busy with other work, which decides how threads wait and how many
BLAS threads a plan's products get (runtime/executor.py, runtime/backends/numba_kernels.py)."""

from __future__ import annotations

import os


def busy_machine() -> bool:
    """Whether other processes keep this machine's cores busy: a 1-minute load average above
    the core count plus one (einplan's own threads keep an otherwise idle machine near its
    core count; at 3 to 4 on the shared 2-core host, transformers already ran 4x slower than
    idle, and 9 to 25 while others benchmarked).

    On a busy machine a second thread's partner waits for a core: measured at load 14-15 on 2
    cores, a 512x128x172 product took 229 us on 1 BLAS thread and 35 ms (median) on 2, and
    SmolLM2 batch-8 decode ran at 12.8 tok/s on 1 and 0.8 on 2 (benchmarks/threads.py)."""
    cores = os.cpu_count() or 1
    try:
        return os.getloadavg()[0] > cores + 1
    except OSError:  # no load average on this platform
        return False
