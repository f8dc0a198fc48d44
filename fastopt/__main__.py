"""Command line: ``python -m fastopt info`` and ``python -m fastopt bench`` (also the
``fastopt`` console script)."""

import argparse
import os
import platform
import sys


def info(out=None):
    """Versions, threads, backends with their capabilities, CUDA devices."""
    out = sys.stdout if out is None else out
    import numba
    import numpy as np

    from . import __version__, backends
    from .backends.base import FEATURES
    w = out.write
    w(f"fastopt {__version__}  ({os.path.dirname(__file__)})\n")
    w(f"python {platform.python_version()}  numpy {np.__version__}  numba {numba.__version__}\n")
    w(f"machine: {platform.machine()} {platform.processor() or ''}, "
      f"{os.cpu_count()} CPUs, numba threads {numba.get_num_threads()} "
      f"(threading layer: {numba.config.THREADING_LAYER})\n")
    caps = backends.capabilities()
    feats = list(FEATURES)
    w("\nbackends (x: supported)\n")
    width = max(len(f) for f in feats)
    names = sorted(caps)
    w(" " * (width + 2) + "  ".join(f"{n:>7}" for n in names) + "\n")
    for f in feats:
        w(f"  {f:<{width}}" + "  ".join(f"{('x' if f in caps[n] else '-'):>7}"
                                        for n in names) + "\n")
    for name, why in sorted(backends.unavailable().items()):
        w(f"\n{name}: not available: {why}\n")
    if "cython" in caps:
        from . import _cy_dense
        w(f"\ncython: OpenMP threads {_cy_dense.openmp_max_threads()}\n")
    if "cuda" in caps:
        from numba import cuda
        try:
            for d in cuda.list_devices():
                w(f"cuda device {d.id}: {d.name.decode() if isinstance(d.name, bytes) else d.name}\n")
        except Exception as exc:      # noqa: BLE001 (informational only)
            w(f"cuda devices: could not list ({exc})\n")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, threads, backends and their capabilities, "
                                "CUDA devices")
    bench = sub.add_parser("bench", help="print the optimizer throughput table for this machine")
    bench.add_argument("--quick", action="store_true",
                       help="smaller sizes and shorter timing (about a minute)")
    bench.add_argument("--rules", default=None,
                       help="comma-separated rule names (default: every rule)")
    bench.add_argument("--backends", default=None,
                       help="comma-separated fastopt backends (default: all available host "
                            "backends)")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                       help="cpu (default) or cuda")
    bench.add_argument("--json", metavar="FILE", default=None,
                       help="write the record (machine, versions, bandwidth, every row "
                            "with best, median and spread) to FILE")
    bench.add_argument("--plot", metavar="FILE.png", default=None,
                       help="write a chart: fraction of the bandwidth bound and speed-up "
                            "over torch per case (needs matplotlib: fastopt[plot])")
    bench.add_argument("--compare", metavar="OLD.json", default=None,
                       help="also print new/old time ratios against a saved --json "
                            "record; exit status 3 when a row regressed")
    bench.add_argument("--markdown", action="store_true",
                       help="print the table as Markdown (the README table)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()

    from . import backends, benchmark
    from . import rules as registry
    if args.device == "cuda":
        from .backends import cuda as cuda_backend
        if cuda_backend.register_backend() is None:
            why = backends.unavailable().get("cuda", "unknown reason")
            print(f"fastopt bench --device cuda: the CUDA backend is not available: {why}",
                  file=sys.stderr)
            return 2
        if cuda_backend._SIM:
            print("fastopt bench --device cuda: NUMBA_ENABLE_CUDASIM is set; GPU timings in "
                  "the CUDA simulator mean nothing. Run it on a machine with a GPU.",
                  file=sys.stderr)
            return 2
        from .benchmark import cuda as cuda_bench
        rules = None
        if args.rules:
            rules = [r.strip() for r in args.rules.split(",")]
            for r in rules:
                registry.get(r)
        cuda_bench.benchmark_table(quick=args.quick, rules=rules)
        return 0
    old = benchmark.report.load_json(args.compare) if args.compare else None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fastopt bench --plot needs matplotlib: pip install 'fastopt[plot]'",
                  file=sys.stderr)
            return 2
    cases = benchmark.default_cases(quick=args.quick)
    if args.rules:
        wanted = [r.strip() for r in args.rules.split(",")]
        for r in wanted:
            if registry.get(r).matrix is not None:
                print(f"fastopt bench: {r} is compute-bound (its steps are matrix "
                      "products), so it is measured against the GEMM rate by "
                      "bench/muon_bench.py (docs/benchmarks.md), not here",
                      file=sys.stderr)
                return 2
        cases = [c for c in cases if c.rule in wanted]
        # a named rule outside the (quick) table still gets its one-tensor row
        size = 1_000_000 if args.quick else 10_000_000
        cases += [benchmark.Case(r, (size,)) for r in wanted
                  if not any(c.rule == r for c in cases)]
    host = args.backends.split(",") if args.backends else None
    if host:
        for name in host:
            backends.resolve(name)
    result = benchmark.run(cases, host=host, quick=args.quick,
                           fmt="markdown" if args.markdown else "text")
    if args.json:
        benchmark.report.to_json(result, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        benchmark.report.plot(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if old is not None:
        lines, regressions = benchmark.report.compare(old, result)
        print("\n" + "\n".join(lines))
        if regressions:
            print(f"{len(regressions)} row(s) regressed against {args.compare}",
                  file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
