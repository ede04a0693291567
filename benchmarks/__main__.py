"""``python -m benchmarks``: run every benchmark, write benchmarks/results.json, regenerate README.md's figures table.

``--only NAME ...`` (or ``SWITCHYARD_BENCH_ONLY=name,name``) runs some of them; ``--quick`` gives each
small arguments (the same code paths, no meaningful figures; what the tests run). ``--merge`` keeps
the existing results of the benchmarks not run now. ``--no-readme`` leaves README.md alone.
Exit code 0 when every benchmark run exited 0 with a last-line JSON, 1 otherwise (``met`` false is
reported, not an error: a missed target is a figure too).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.readme import update_readme  # noqa: E402
from benchmarks.suite import BENCHMARKS, RESULTS, ROOT, run_suite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=list(BENCHMARKS),
                    default=[n for n in os.environ.get("SWITCHYARD_BENCH_ONLY", "").split(",") if n] or None,
                    help=f"run only these ({', '.join(BENCHMARKS)})")
    ap.add_argument("--quick", action="store_true", default=os.environ.get("SWITCHYARD_BENCH_QUICK") == "1",
                    help="small arguments: exercises every path, figures mean nothing")
    ap.add_argument("--merge", action="store_true", help="keep existing results of benchmarks not run now")
    ap.add_argument("--out", default=RESULTS, help=f"results file (default {RESULTS})")
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"), help="README whose figures block to rewrite")
    ap.add_argument("--no-readme", action="store_true", help="write the results file only")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark before it is killed")
    args = ap.parse_args(argv)
    results = run_suite(args.only, quick=args.quick, out=args.out, merge=args.merge, timeout=args.timeout)
    print(f"results: {args.out}")
    if not args.no_readme:
        update_readme(results, args.readme)
        print(f"figures table rewritten in {args.readme}")
    ran = [results["benchmarks"][n] for n in (args.only or BENCHMARKS)]
    failed = [e["script"] for e in ran if not e.get("skipped") and (e.get("rc") != 0 or e.get("result") is None)]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
