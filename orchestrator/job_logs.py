"""``switchyard logs``, and reading a job's rank logs (``<run_dir>/logs/rank_R.log``) for it and the API's route.

Each call returns what the ranks wrote since the offsets it was given (and
moves them), so following a job is calling it again; with ``tail`` the first
read of each file keeps only its last lines, as ``tail -n`` does. Lines of
several ranks carry a ``[rank_R]`` prefix. The dashboard reads its own
bounded chunks (``orchestrator/dashboard.py``).
"""
from __future__ import annotations

import posixpath
import sys
import time


def log_files(storage, run_dir: str, rank: int | str | None = None) -> list[str]:
    """The rank log files of the run at ``run_dir`` (only rank ``rank``'s when given), in rank order."""
    log_dir = posixpath.join(run_dir, "logs")
    files = sorted(storage.fs.glob(f"{log_dir}/rank_*.log")) if storage.exists(log_dir) else []
    key = lambda f: int(posixpath.basename(f)[5:-4]) if posixpath.basename(f)[5:-4].isdigit() else 1 << 30  # noqa: E731
    return sorted((f for f in files if rank is None or posixpath.basename(f) == f"rank_{rank}.log"), key=key)


def read_new(storage, files: list[str], offsets: dict[str, int], tail: int | None = None) -> list[str]:
    """The lines written to ``files`` since ``offsets`` (file -> bytes read; updated), the last ``tail`` of each
    file on its first read when ``tail`` is given."""
    lines = []
    for f in files:
        first = f not in offsets
        with storage.fs.open(f, "rb") as fh:
            fh.seek(offsets.get(f, 0))
            data = fh.read()
        offsets[f] = offsets.get(f, 0) + len(data)
        new = data.decode(errors="replace").splitlines()
        if first and tail is not None:
            new = new[len(new) - tail:] if tail else []
        prefix = f"[{posixpath.basename(f)[:-4]}] " if len(files) > 1 else ""
        lines += [prefix + line for line in new]
    return lines


def cmd_logs(args) -> int:
    """`switchyard logs JOB [--rank R] [--tail N] [--follow]`: the start-up phases, then the ranks' lines."""
    from data.storage import Storage
    from orchestrator.cli_jobs import _cluster, _remote, _store
    from workers.phases import Watcher

    client = _remote(args)
    if client is not None:
        for line in client.logs(args.job, args.rank, args.follow, args.tail):
            print(line, flush=True)
        return 0
    cluster = _cluster(args)
    rec = _store(cluster).get(args.job)
    storage = Storage(cluster.storage, dict(cluster.storage_options))
    offsets: dict[str, int] = {}
    startup = Watcher(storage, rec.run_dir)  # the start-up phases (workers/phases.py) come first
    while True:
        if args.tail is None:
            for line in startup.poll():
                print(line)
        files = log_files(storage, rec.run_dir, args.rank)
        for line in read_new(storage, files, offsets, args.tail):
            print(line)
        sys.stdout.flush()
        if not args.follow or _store(cluster).get(rec.id).terminal:
            if not files and not args.follow:
                print(f"no logs yet in {posixpath.join(rec.run_dir, 'logs')}", file=sys.stderr)
            return 0
        time.sleep(1.0)
