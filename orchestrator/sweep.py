"""Running a scaling-law sweep through the controller.

``switchyard sweep SWEEP.yaml`` plans the IsoFLOP grid (``sweep_plan``), shows
the plan, and submits every run as a job, children of one ``sweep`` record in
the job store. The controller writes each finished run's row into the sweep's
Parquet table (``sweep_table``) and, once every run has ended, fits the table
(``fit_report``) into ``<sweep_dir>/fit/``.

Submitting the same sweep again resumes it: runs with a results row, or with a
job still queued or running, are not submitted again. ``plan.json`` keeps each
budget's centre and every adaptive run, so a resubmit plans the same runs;
budgets new to the sweep are centred on the optimum its finished budgets
predict (``scaling.plan.centres_from_results``) unless the sweep has a prior.

When every run has ended, ``extend_sweep`` (called by the controller before
the fit) adds the adaptive round: more sizes for budgets whose IsoFLOP vertex
lies outside their sizes (``scaling.plan.extend_plan``), recorded in
``rounds.json``. The fit runs once no round adds anything.
"""
from __future__ import annotations

import posixpath
import sys

from orchestrator import json_output
from dataclasses import dataclass

from data.storage import Storage
from specs.errors import UsageError
from orchestrator.job_store import JobState, JobStore, safe_join
from specs.job import apply_overrides, validate_spec

DEFAULT_FLOPS_PER_S = 2.0e10  # per worker, CPU-ish; used only for the time estimate in the plan


def sweep_dir(cluster, name: str) -> str:
    return safe_join(cluster.storage, "sweeps", name)


def _storage(cluster) -> Storage:
    return Storage(cluster.storage, dict(cluster.storage_options))


def finished_runs(storage: Storage, sdir: str) -> set[str]:
    folder = posixpath.join(sdir, "results")
    if not storage.exists(folder):
        return set()
    return {posixpath.basename(p)[: -len(".parquet")] for p in storage.fs.glob(f"{folder}/*.parquet")
            if not posixpath.basename(p).startswith(".")}


def is_sweep_file(raw) -> bool:
    """A sweep file, not one job's spec or a pipeline file: it names budgets (``submit`` takes all three)."""
    return isinstance(raw, dict) and "pipeline" not in raw and ("budgets" in raw or "total_budget" in raw)


def find_sweep(store: JobStore, name: str):
    """The sweep record of this name, or None (the jobs_name index, not a walk over the store)."""
    found = store.by_name(name, "sweep")
    return found[0] if found else None


@dataclass(frozen=True)
class RunRecord:
    """A run as plan.json keeps it: enough to resubmit it and to plan the next round."""

    name: str
    job_name: str
    budget: float
    n_params: int
    round: int
    centre: float
    overrides: dict


def _plan_entry(r) -> dict:
    return {"run_id": r.name, "job_name": r.job_name, "budget": r.budget, "n_params": r.n_params,
            "n_params_non_embedding": r.n_params_non_embedding, "tokens": r.tokens, "steps": r.steps,
            "d_model": r.shape.d_model, "n_layers": r.shape.n_layers, "n_heads": r.shape.n_heads,
            "round": r.round, "centre": r.target_n, "overrides": r.overrides}


def read_plan(storage: Storage, sdir: str) -> list[RunRecord]:
    """The runs an earlier submit or adaptive round planned (empty for a new sweep)."""
    path = f"{sdir}/plan.json"
    if not storage.exists(path):
        return []
    out = []
    for e in storage.read_json(path):
        if "overrides" not in e:            # written before plan.json kept overrides: plan afresh
            return []
        out.append(RunRecord(e["run_id"], e["job_name"], float(e["budget"]), int(e["n_params"]),
                             int(e.get("round", 1)), float(e.get("centre", 0.0)), dict(e["overrides"])))
    return out


def _history(sdir: str):
    """(N, D, loss) of the runs in the sweep's table, held-out loss where there is one, or None."""
    import numpy as np

    from scaling.table import read_results

    table = read_results(sdir)
    if table.num_rows == 0:
        return None
    held = table.column("held_out_loss").to_pylist()
    final = table.column("final_loss").to_pylist()
    loss = np.array([h if h is not None else f for h, f in zip(held, final)], float)
    n = np.array(table.column("n_params").to_pylist(), float)
    d = np.array(table.column("tokens").to_pylist(), float)
    ok = np.isfinite(loss) & (loss > 0)
    return n[ok], d[ok], loss[ok]


def submit_sweep(cluster, path, dry_run: bool = False, flops_per_s: float | None = None, log=print, *,
                 owner: str | None = None, admin: bool = False, after: list[str] | tuple[str, ...] = (),
                 source: str | None = None) -> dict:
    """Plan the sweep (a YAML path, or a validated ``SweepSpec`` with ``source`` naming it) and submit its runs.

    The sweep belongs to ``owner`` (default: the local user) and so do its runs; resubmitting someone
    else's sweep needs its owner or an admin (``admin``, or ``admins:`` of cluster.yaml), as cancelling it does. Every run waits for ``after``
    (``--after``): a dependency that fails or is cancelled fails the runs, and the sweep with that reason.
    """
    from orchestrator.cli_jobs import authorize, local_user
    from scaling.plan import format_plan, plan_sweep
    from scaling.sweep_spec import SweepSpec, load_sweep

    if owner is None:
        owner, admin = local_user(), False

    spec = path if isinstance(path, SweepSpec) else load_sweep(path)
    path = source or (spec.name if isinstance(path, SweepSpec) else path)
    storage = _storage(cluster)
    sdir = sweep_dir(cluster, spec.name)
    before = read_plan(storage, sdir)
    centres = {r.budget: r.centre for r in before if r.round == 1}
    plan = plan_sweep(spec, centres=centres, history=_history(sdir) if storage.exists(sdir) else None)
    planned = {r.name for r in plan.runs}
    extra = [r for r in before if r.round > 1 and r.name not in planned]     # adaptive rounds of earlier submits
    workers = plan.tokens_per_step and validate_spec(plan.job_spec(plan.runs[0])).resources.workers
    rate = flops_per_s or DEFAULT_FLOPS_PER_S * workers
    log(format_plan(plan, flops_per_second=rate))
    if dry_run:
        return {"sweep": spec.name, "runs": len(plan.runs) + len(extra), "submitted": [], "dry_run": True}
    storage.makedirs(sdir)
    storage.write_json(f"{sdir}/sweep.json", spec.model_dump(mode="json"))
    old = {e["run_id"]: e for e in storage.read_json(f"{sdir}/plan.json")} if extra else {}
    storage.write_json(f"{sdir}/plan.json", [_plan_entry(r) for r in plan.runs] + [old[r.name] for r in extra])
    store = JobStore(cluster.job_store)
    parent = find_sweep(store, spec.name)
    if parent is not None and not admin:
        authorize(cluster, owner, parent, "resubmit")
    if parent is None:
        parent = store.submit(spec.name, "sweep", {"sweep_dir": sdir, "runs": len(plan.runs)}, spec.priority,
                              {"workers": 0, "cpus_per_worker": 0, "gpus_per_worker": 0}, 0,
                              run_dir_for=lambda _id: sdir, owner=owner, team=cluster.team_of(owner),
                              after=list(after))
        store.transition(parent.id, JobState.STARTING, "sweep submitted")
        store.transition(parent.id, JobState.RUNNING, f"{len(plan.runs)} runs planned")
    elif parent.state in (JobState.QUEUED, JobState.STARTING):  # an earlier submit stopped half way
        if parent.state == JobState.QUEUED:
            store.transition(parent.id, JobState.STARTING, "sweep submitted")
        parent = store.transition(parent.id, JobState.RUNNING, "submission completed")
    elif parent.terminal:
        raise UsageError(f"sweep {spec.name} already ended ({parent.state.value}); its table is in {sdir}. "
                         f"Rename the sweep to run it again")
    done = finished_runs(storage, sdir)
    live = {c.name for c in store.list(parent_id=parent.id) if not c.terminal}
    submitted = []
    todo = [(r.name, r.job_name, r.overrides) for r in plan.runs] + [(r.name, r.job_name, r.overrides) for r in extra]
    for name, job_name, overrides in todo:
        if name in done or job_name in live:
            continue
        job_spec = validate_spec(apply_overrides(spec.job_base(), overrides), source=f"{path} run {name}")
        submitted.append(_submit_child(cluster, job_spec, spec.priority, parent.id, parent.after))
    log(f"sweep {spec.name}: {len(submitted)} runs submitted, {len(done)} already finished, "
        f"{len(live)} still queued or running; table in {sdir}")
    return {"sweep": spec.name, "id": parent.id, "sweep_dir": sdir, "runs": len(todo),
            "submitted": submitted, "finished": sorted(done), "owner": parent.owner, "after": list(parent.after)}


def _submit_child(cluster, spec, priority: int, parent_id: str, after: tuple[str, ...] = ()) -> str:
    from orchestrator.preflight import preflight
    from workers.resources import worker_resources

    preflight(spec, _storage(cluster))
    res = worker_resources(spec, cluster)
    rec = JobStore(cluster.job_store).submit(
        spec.name, "sweep-run", spec.to_dict(), priority,
        {"workers": res.workers, "cpus_per_worker": res.cpus, "gpus_per_worker": res.gpus}, spec.max_restarts,
        run_dir_for=lambda job_id: safe_join(cluster.storage, f"{spec.name}-{job_id}"), parent_id=parent_id,
        after=after)
    return rec.id


def sweep_status(cluster, name: str) -> dict:
    store = JobStore(cluster.job_store)
    parent = find_sweep(store, name)
    if parent is None:
        raise UsageError(f"no sweep named {name!r}; `switchyard list` shows the jobs")
    storage = _storage(cluster)
    sdir = parent.spec["sweep_dir"]
    children = store.list(parent_id=parent.id)
    done = finished_runs(storage, sdir)
    counts: dict[str, int] = {}
    for c in children:
        counts[c.state.value] = counts.get(c.state.value, 0) + 1
    planned = len(read_plan(storage, sdir)) or parent.spec["runs"]
    return {"sweep": name, "id": parent.id, "state": parent.state.value, "sweep_dir": sdir,
            "runs": planned, "results": len(done), "jobs": counts,
            "fit": f"{sdir}/fit/fit.json" if storage.exists(f"{sdir}/fit/fit.json") else None,
            "reason": parent.reason, "owner": parent.owner, "team": parent.team, "after": list(parent.after)}


# ---------------------------------------------------------------------- controller side


def record_result(store: JobStore, storage: Storage, job_id: str) -> None:
    """A sweep run ended well: add its row to the sweep's table."""
    from models.transformer_config import DecoderConfig, flops_per_token
    from scaling.table import append_row, make_row

    rec = store.get(job_id)
    parent = store.get(rec.parent_id)
    sdir = parent.spec["sweep_dir"]
    spec = validate_spec(rec.spec)
    info = storage.read_json(f"{rec.run_dir}/model_config.json")
    cfg = DecoderConfig.from_dict(info["model"])
    fpt = flops_per_token(cfg, spec.data.seq_len)
    run_id = rec.name[len(parent.name) + 1:]
    m = rec.metrics or {}
    row = make_row(run_id=run_id, family=spec.model.family, n_params=info["total"],
                   n_params_non_embedding=info["non_embedding"], tokens=spec.total_steps * spec.tokens_per_step,
                   attention_flops_per_token=fpt["with_attention"] - fpt["6N"], final_loss=m["loss"],
                   spec_hash=spec.spec_hash(), held_out_loss=m.get("held_out_loss"),
                   curve_path=f"{rec.run_dir}/metrics.jsonl")
    append_row(sdir, row)


def extend_sweep(cluster, store: JobStore, storage: Storage, parent) -> list[str]:
    """The next adaptive round of a sweep whose runs have all ended: submit it and return the job ids.

    Budgets whose IsoFLOP vertex lies outside their sizes get up to
    ``adaptive.extra_sizes`` sizes on the side of the vertex, at most
    ``adaptive.rounds`` times; the reasons go to ``rounds.json``. An empty
    list means no round is due: fit the table.
    """
    from scaling.plan import extend_plan
    from scaling.sweep_spec import validate_sweep

    sdir = parent.spec["sweep_dir"]
    if not storage.exists(f"{sdir}/sweep.json"):
        return []
    spec = validate_sweep(storage.read_json(f"{sdir}/sweep.json"), source=f"{sdir}/sweep.json")
    before = read_plan(storage, sdir)
    history = _history(sdir)
    if not before or history is None:
        return []
    round_no = max(r.round for r in before) + 1
    new, why = extend_plan(spec, before, *history, round_no=round_no)
    if not new:
        return []
    storage.write_json(f"{sdir}/plan.json", storage.read_json(f"{sdir}/plan.json") + [_plan_entry(r) for r in new])
    rounds = storage.read_json(f"{sdir}/rounds.json") if storage.exists(f"{sdir}/rounds.json") else []
    rounds.append({"round": round_no, "runs": [r.name for r in new], "reasons": [e.reason for e in why]})
    storage.write_json(f"{sdir}/rounds.json", rounds)
    ids = []
    for r in new:
        job_spec = validate_spec(apply_overrides(spec.job_base(), r.overrides), source=f"sweep {spec.name} run {r.name}")
        ids.append(_submit_child(cluster, job_spec, spec.priority, parent.id, parent.after))
    print(f"sweep {spec.name}: adaptive round {round_no}: {len(new)} runs; " + "; ".join(e.reason for e in why),
          flush=True)
    return ids


def fit_sweep(storage: Storage, sdir: str) -> dict:
    """Fit the finished table into <sweep_dir>/fit (a Ray task of the controller)."""
    from scaling.fit_table import load_table
    from scaling.report import run_fits, write_report

    table = load_table(sdir)
    rep = run_fits(table, n_bootstrap=100, seed=0)
    return write_report(rep, f"{sdir}/fit")


def register(sub) -> None:
    p = sub.add_parser("sweep", help="plan and run an IsoFLOP sweep (`sweep status NAME` shows progress)")
    p.add_argument("target", help="SWEEP.yaml, or 'status'")
    p.add_argument("name", nargs="?", help="with 'status': the sweep's name")
    p.add_argument("--dry-run", action="store_true", help="show the plan, submit nothing")
    p.add_argument("--flops-per-s", type=float, default=None,
                   help="throughput for the time estimate (default 2e10 per worker)")
    p.add_argument("--after", default=None, metavar="JOB[,JOB...]",
                   help="start the runs only once these jobs have SUCCEEDED (the sweep fails if one does not)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sweep)


def print_sweep_status(out: dict, as_json: bool) -> None:
    if as_json:
        print(json_output.dumps(out))
        return
    jobs = ", ".join(f"{k.lower()} {v}" for k, v in sorted(out["jobs"].items()))
    print(f"sweep {out['sweep']} ({out['id']}): {out['state']}; {out['results']}/{out['runs']} runs in the "
          f"table; jobs: {jobs or 'none'}; owner {out.get('owner') or '-'}")
    print(f"table: {out['sweep_dir']}/results" + (f"; fit: {out['fit']}" if out["fit"] else ""))
    if out.get("after"):
        print(f"after: {', '.join(out['after'])}")
    if out.get("reason") and out["state"] in ("FAILED", "CANCELLED"):
        print(f"reason: {out['reason']}")


def sweep_of_file(raw, source: str, priority: int | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """(raw, SweepSpec) of a sweep file given to ``submit``, with its --priority and --set applied."""
    from scaling.sweep_spec import validate_sweep

    raw = apply_overrides(raw, list(overrides)) if isinstance(raw, dict) else raw
    if priority is not None and isinstance(raw, dict):
        raw["priority"] = priority
    return raw, validate_sweep(raw, source=source)


def submit_remote(client, raw, source: str, priority: int | None = None, overrides: list[str] | tuple[str, ...] = (),
                  after: list[str] | tuple[str, ...] = (), dry_run: bool = False, flops_per_s: float | None = None,
                  log=print) -> dict:
    """Validate a sweep file here (the server validates and plans it again), refuse laptop files in its base,
    and send it over the API."""
    from orchestrator.api_client import refuse_local_files

    raw, spec = sweep_of_file(raw, source, priority, overrides)
    refuse_local_files(spec.base, source, prefix="base.")
    out = client.submit_sweep(raw, dry_run=dry_run, flops_per_s=flops_per_s, after=list(after),
                              source=posixpath.basename(source))
    for line in out.pop("log", []):
        log(line)
    return out


def cmd_sweep(args) -> int:
    from orchestrator.cli_jobs import _after, _remote
    from orchestrator.cluster_config import load_cluster_config

    cluster = load_cluster_config(args.cluster)
    client = _remote(args)
    if args.target == "status":
        if not args.name:
            raise UsageError("sweep status: give the sweep's name")
        print_sweep_status(client.sweep(args.name) if client else sweep_status(cluster, args.name), args.json)
        return 0
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    if client is not None:
        from specs.job import read_yaml

        out = submit_remote(client, read_yaml(args.target), args.target, after=_after(args), dry_run=args.dry_run,
                            flops_per_s=args.flops_per_s, log=log)
    else:
        out = submit_sweep(cluster, args.target, dry_run=args.dry_run, flops_per_s=args.flops_per_s, log=log,
                           after=_after(args))
    if args.json:
        print(json_output.dumps(out))
    return 0


# ---------------------------------------------------------------------- `fit` from a laptop


def register_fit(sub) -> None:
    """``fit TABLE`` (scaling.report) fits a table here; from a laptop it also takes a sweep's name."""
    from scaling.fit_command import add_fit_command

    p = add_fit_command(sub)
    p.set_defaults(func=cmd_fit)


def cmd_fit(args) -> int:
    """A table or URI this machine can read is fitted here. Otherwise, with ``api.url`` in cluster.yaml,
    TABLE names a sweep and the controller's fit of it is fetched (--out keeps its fit.json here)."""
    import os

    from orchestrator.cli_jobs import _remote
    from scaling.report import fit_command, summary_lines

    client = None if "://" in args.table or os.path.exists(args.table) else _remote(args)
    if client is None:
        return fit_command(args)
    if args.bootstrap != 100 or args.seed != 0 or args.loss_column:
        raise UsageError(f"fit {args.table}: over the API this shows the controller's fit of sweep {args.table}; "
                         "--bootstrap, --seed and --loss-column apply to a table fitted on this machine")
    data = client.sweep_fit(args.table)
    if args.out:
        out = Storage(args.out)
        out.makedirs(args.out)
        out.write_json(out.path("fit.json"), data)
    if args.json:
        print(json_output.dumps(data))
        return 0
    print("\n".join(summary_lines(data)))
    print(f"fit of sweep {args.table}: {data['outputs']['json']} on the cluster"
          + (f"; fit.json written to {args.out}" if args.out else ""))
    return 0
