"""`switchyard fit`'s arguments and handler; the fitting itself is ``scaling.report``.

Registering the command imports neither the fits (scipy) nor the plots
(matplotlib): every ``switchyard`` command builds the whole parser, so
``fit_command`` imports ``scaling.report`` only when ``fit`` runs.
"""
from __future__ import annotations

import argparse
import json
import sys

from specs.errors import UsageError


def add_fit_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `fit TABLE [--out DIR] [--json] [--bootstrap N] [--seed S] [--loss-column NAME]`."""
    p = subparsers.add_parser(
        "fit", help="fit Chinchilla scaling laws (approaches 1-3) to a sweep's results",
        description="Fit approaches 1, 2 and 3 of the Chinchilla paper to a results table and write "
                    "fit.json, fit.md and plots. TABLE is a sweep directory or a CSV/Parquet file with "
                    "columns for N (N/params/n_params), D (D/tokens) or C (C/flops/compute) and the loss "
                    "(loss/held_out_loss/final_loss).")
    p.add_argument("table", help="sweep directory, or a .csv/.parquet table (any fsspec URI)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output directory (default: <sweep>/fit or <table stem>_fit)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    p.add_argument("--bootstrap", metavar="N", type=int, default=100,
                   help="bootstrap resamples for the intervals (0 = none; default 100)")
    p.add_argument("--seed", metavar="S", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--loss-column", metavar="NAME", default=None,
                   help="which column holds the loss (default: the first of loss, held_out_loss, final_loss, ...)")
    p.set_defaults(func=fit_command)
    return p


def fit_command(args: argparse.Namespace) -> int:
    """Handler of `fit`: UsageError (exit code 2 in the CLI) on bad input, else 0."""
    from scaling.fit_table import load_table
    from scaling.report import PLOTS, default_out_dir, run_fits, summary_lines, write_report

    if args.bootstrap < 0 or args.bootstrap == 1:
        raise UsageError(f"fit: --bootstrap {args.bootstrap}: give 0 (no intervals) or at least 2 resamples")
    table = load_table(args.table, loss_column=args.loss_column)
    out_dir = args.out or default_out_dir(args.table)
    if not args.json:
        print(f"fitting {table.n.size} runs from {args.table} ...", file=sys.stderr)
    rep = run_fits(table, n_bootstrap=args.bootstrap, seed=args.seed)
    data = write_report(rep, out_dir)
    if args.json:
        print(json.dumps(data))
        return 0
    print("\n".join(summary_lines(data)))
    print(f"wrote {data['outputs']['json']}, {data['outputs']['markdown']} and {len(PLOTS)} plots")
    return 0
