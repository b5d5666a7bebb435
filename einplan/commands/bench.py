"""``einplan bench machine``: measure and cache this machine's GEMM peak and memory bandwidth,
the roofs of the cost report's roofline."""

from __future__ import annotations

import argparse

from einplan.commands.arguments import positive_int


def run(args: argparse.Namespace) -> None:
    """Measure, print and cache the machine's limits."""
    from einplan.report.machine import measure_machine, save_machine

    limits = measure_machine(args.gemm_n, args.copy_mib, args.reps)
    path = save_machine(limits)
    ridge = limits["gemm_gflops"] / limits["bandwidth_gbs"]
    print(
        f"GEMM peak   {limits['gemm_gflops']:8.1f} GFLOP/s  (float32 {args.gemm_n}^3 matmul, "
        f"{limits['cpus']} cpus)\n"
        f"bandwidth   {limits['bandwidth_gbs']:8.1f} GB/s     ({args.copy_mib} MiB copy, read "
        f"+ write)\nridge point {ridge:8.1f} FLOP/byte (below: memory-bound)\nwrote {path}"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` parser."""
    b = sub.add_parser("bench", help="measure this machine's limits (GEMM peak, bandwidth)")
    b.add_argument("target", choices=["machine"], help="what to measure")
    b.add_argument("--gemm-n", type=positive_int, default=2048, help="size of the square GEMM")
    b.add_argument("--copy-mib", type=positive_int, default=256, help="size of the copied array")
    b.add_argument(
        "--reps", type=positive_int, default=5, help="timed repetitions (best one counts)"
    )
    b.set_defaults(func=run)
