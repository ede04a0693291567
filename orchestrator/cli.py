"""The ``switchyard`` command line."""
from __future__ import annotations

import argparse
import os
import sys

from orchestrator import json_output
from specs.errors import UsageError


def _cluster(args):
    from orchestrator.cluster_config import load_cluster_config

    return load_cluster_config(args.cluster)


def cmd_run(args) -> int:
    from orchestrator.runner import resume_spec, run_job, storage_of
    from specs.job import load_spec

    cluster = _cluster(args)
    if args.resume:
        spec = resume_spec(storage_of(cluster), args.resume, args.set)
    elif args.spec:
        spec = load_spec(args.spec, args.set)
    else:
        raise UsageError("run: give a SPEC file, or --resume RUN_DIR")
    from specs.paths import check_job_paths

    roots = cluster.path_roots()
    check_job_paths(spec, roots, where=args.spec or args.resume)
    if args.resume and roots is not None and not roots.can_write(args.resume):
        raise UsageError(f"--resume {args.resume}: not under the storage root or a write root of cluster.yaml")
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    result = run_job(spec, cluster, resume_dir=args.resume, log=log)
    if args.json:
        print(json_output.dumps(result))
    else:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"
        print(f"{result['state']}: {result['id']} steps={result['steps'] or '-'} "
              f"loss {fmt(result.get('first_loss'))} -> {fmt(result.get('final_loss'))} run_dir={result['run_dir']}")
    return 0 if result["state"] == "SUCCEEDED" else 1


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``switchyard: error: ...``) and exit code 2, as every other error."""

    def error(self, message: str):
        where = self.prog.removeprefix("switchyard").strip()
        self.exit(2, f"switchyard: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="switchyard", description="Train transformer LMs on Ray + DeepSpeed.")
    parser.add_argument("--cluster", default=None, help="cluster.yaml to use (default: ./cluster.yaml or $SWITCHYARD_CLUSTER)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one job to completion, blocking, with progress")
    p.add_argument("spec", nargs="?", help="job spec YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field, e.g. train.steps=50")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its latest complete checkpoint")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.set_defaults(func=cmd_run)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands owned by other modules register themselves here."""
    from orchestrator.cli_access import register as register_access
    from orchestrator.cli_jobs import register as register_jobs

    from orchestrator.sweep import register as register_sweep

    out = [register_jobs, register_access, register_sweep]
    try:
        from orchestrator.sweep import register_fit

        out.append(register_fit)
    except ImportError:
        pass
    from orchestrator.export import add_export_command

    out.append(add_export_command)
    from orchestrator.cli_data import register as register_data

    out.append(register_data)
    return out


def _ray_env_for(args) -> None:
    """Ray reads its settings from the environment when it is imported: decide them before any command imports ray.

    The local Ray Switchyard starts uses Ray's token authentication with Switchyard's own token
    (kept with its state, see orchestrator/local_head.py), and every command that reaches it uses the same.
    Ray's uv hook cannot pickle the py_modules Switchyard ships over Ray Client (``ray://``), and
    Switchyard's packages travel as py_modules anyway, so the hook is off unless the user turned it on.
    """
    from orchestrator.cluster_config import load_cluster_config
    from orchestrator.local_head import use_local_auth

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    cluster = load_cluster_config(args.cluster)
    if cluster.ray.address == "local":
        use_local_auth(cluster)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _ray_env_for(args)
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"switchyard: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`switchyard status X | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
