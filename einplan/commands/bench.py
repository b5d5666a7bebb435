"""``einplan bench machine``: measure and cache this machine's GEMM peak and memory bandwidth,
the roofs of the cost report's roofline."""

from __future__ import annotations

import argparse

from einplan.commands.arguments import positive_int


def run(args: argparse.Namespace) -> None:
    """Measure, print and cache the machine's limits; or time the compiled kernels."""
    if args.target == "kernels":
        run_kernels(args)
        return
    from einplan.report.machine import measure_machine, save_machine

    limits = measure_machine(args.gemm_n, args.copy_mib, args.reps, args.device)
    path = save_machine(limits, args.device)
    ridge = limits["gemm_gflops"] / limits["bandwidth_gbs"]
    where = limits.get("device") or f"{limits['cpus']} cpus"
    tf32 = limits.get("gemm_tf32_gflops")
    print(
        f"GEMM peak   {limits['gemm_gflops']:8.1f} GFLOP/s  (float32 {args.gemm_n}^3 matmul, "
        f"{where})\n"
        + (f"TF32 peak   {tf32:8.1f} GFLOP/s\n" if tf32 else "")
        + f"bandwidth   {limits['bandwidth_gbs']:8.1f} GB/s     ({args.copy_mib} MiB copy, read "
        f"+ write)\nridge point {ridge:8.1f} FLOP/byte (below: memory-bound)\nwrote {path}"
    )


def run_kernels(args: argparse.Namespace) -> None:
    """Print each compiled kernel's first-call cost (cold cache: JIT; cached) and speed."""
    from einplan.api import bench_kernels
    from einplan.errors import EinplanError

    try:
        r = bench_kernels(args.reps)
    except ImportError as e:
        raise EinplanError(f"einplan bench kernels needs numba: pip install numba ({e})") from e
    cold, cached = r["cold"], r["cached"]
    print(f"{'kernel':<16} {'first run (JIT) s':>18} {'cached s':>9}")
    print(f"{'import numba':<16} {cold['import_s']:18.2f} {cached['import_s']:9.2f}")
    for k in cold:
        if k != "import_s":
            print(f"{k:<16} {cold[k]:18.2f} {cached[k]:9.3f}")
    total = sum(cold.values()), sum(cached.values())
    print(f"{'total':<16} {total[0]:18.2f} {total[1]:9.2f}")
    print(f"\n{'product':<38} {'numpy us':>9} {'numba us':>9} {'GEMV us':>9}")
    for s in r["speed"]:
        gemv = f"{s['gemv_us']:9.0f}" if "gemv_us" in s else ""
        print(f"{s['shape']:<38} {s['numpy_us']:9.0f} {s['numba_us']:9.0f} {gemv}")
    print("(fp32: numba = weights as panels, GEMV = the compiled GEMV of an unpacked weight)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` parser."""
    b = sub.add_parser(
        "bench", help="measure this machine's limits (GEMM peak, bandwidth) or kernels"
    )
    b.add_argument(
        "target",
        choices=["machine", "kernels"],
        help="machine: GEMM peak and bandwidth; kernels: compiled kernels' JIT cost and speed",
    )
    b.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="machine: measure the CPU (numpy) or the GPU (cupy; cache machine-cuda.json)",
    )
    b.add_argument("--gemm-n", type=positive_int, default=2048, help="size of the square GEMM")
    b.add_argument("--copy-mib", type=positive_int, default=256, help="size of the copied array")
    b.add_argument(
        "--reps", type=positive_int, default=5, help="timed repetitions (best one counts)"
    )
    b.set_defaults(func=run)
