"""Command line: ``python -m fastopt bench`` (also the ``fastopt`` console script)."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
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
    args = parser.parse_args(argv)

    from . import backends, benchmark, registry
    if args.device == "cuda":
        from . import _cuda_backend
        if _cuda_backend.register_backend() is None:
            why = backends._UNAVAILABLE.get("cuda", "unknown reason")
            print(f"fastopt bench --device cuda: the CUDA backend is not available: {why}",
                  file=sys.stderr)
            return 2
        if _cuda_backend._SIM:
            print("fastopt bench --device cuda: NUMBA_ENABLE_CUDASIM is set; GPU timings in "
                  "the CUDA simulator mean nothing. Run it on a machine with a GPU.",
                  file=sys.stderr)
            return 2
        from . import _cuda_bench
        rules = None
        if args.rules:
            rules = [r.strip() for r in args.rules.split(",")]
            for r in rules:
                registry.get(r)
        _cuda_bench.benchmark_table(quick=args.quick, rules=rules)
        return 0
    cases = benchmark.default_cases(quick=args.quick)
    if args.rules:
        wanted = [r.strip() for r in args.rules.split(",")]
        for r in wanted:
            registry.get(r)
        cases = [c for c in cases if c.rule in wanted]
    host = args.backends.split(",") if args.backends else None
    if host:
        for name in host:
            backends.resolve(name)
    benchmark.run(cases, host_backends=host, min_time=0.1 if args.quick else 0.3,
                  skip_numpy_above=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
