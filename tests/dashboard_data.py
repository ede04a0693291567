"""Records for the dashboard's pipeline and sweep pages, written by the code that writes them in real runs.

A sweep: its parent record, ``plan.json``, a results row per run (``scaling.table.append_row``) and the
fit report (``scaling.report.run_fits`` / ``write_report``) of 12 runs on a known law. A pipeline: its
parent record, its three stage jobs, ``pipeline.json`` and the report dict ``workers.rlhf.report``
returns. Real ones take minutes of training; the pages read the same files and records.
"""
from __future__ import annotations

import numpy as np

from orchestrator.job_store import JobState, JobStore, safe_join

SWEEP_BUDGETS = (1e15, 4e15, 1.6e16)
SWEEP_SIZES = 4  # runs per budget


def law(n, d):
    """Chinchilla's published fit (Hoffmann et al.)."""
    return 1.69 + 406.4 / n ** 0.34 + 410.7 / d ** 0.28


def make_sweep(cfg, name: str = "isoflop", owner: str = "alice", fitted: bool = True) -> dict:
    """A sweep whose runs all finished; ``fitted``: its fit is written too. Returns {id, sweep_dir, runs}."""
    from data.storage import Storage
    from orchestrator.sweep import sweep_dir
    from scaling.table import append_row, make_row

    store = JobStore(cfg.job_store)
    storage = Storage(cfg.storage, dict(cfg.storage_options))
    sdir = sweep_dir(cfg, name)
    storage.makedirs(sdir)
    runs, plan = [], []
    rng = np.random.default_rng(0)
    for c in SWEEP_BUDGETS:
        n_opt = 0.1 * (c / 6) ** 0.5
        for k, n in enumerate(n_opt * np.geomspace(0.25, 4.0, SWEEP_SIZES)):
            n = int(n)
            d = int(c / (6 * n))
            run_id = f"c{c:.0e}-n{n}".replace("+", "")
            runs.append(make_row(run_id=run_id, family="llama", n_params=n, n_params_non_embedding=int(0.8 * n),
                                 tokens=d, attention_flops_per_token=0.0, spec_hash="h",
                                 final_loss=float(law(n, d) * np.exp(rng.normal(0, 0.002))),
                                 held_out_loss=float(law(n, d) * np.exp(rng.normal(0, 0.002)))))
            plan.append({"run_id": run_id, "job_name": f"{name}-{run_id}", "budget": c, "n_params": n,
                         "n_params_non_embedding": int(0.8 * n), "tokens": d, "steps": 10 + k, "d_model": 64,
                         "n_layers": 2, "n_heads": 2})
    storage.write_json(f"{sdir}/plan.json", plan)
    parent = store.submit(name, "sweep", {"sweep_dir": sdir, "runs": len(runs)}, 0,
                          {"workers": 0, "cpus_per_worker": 0, "gpus_per_worker": 0}, 0,
                          run_dir_for=lambda _id: sdir, owner=owner)
    store.transition(parent.id, JobState.STARTING, "sweep submitted")
    store.transition(parent.id, JobState.RUNNING, f"{len(runs)} runs planned")
    for row, p in zip(runs, plan):
        child = store.submit(p["job_name"], "sweep-run", {"name": p["job_name"]}, 0,
                             {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}, 0,
                             run_dir_for=lambda job_id, p=p: safe_join(cfg.storage, f"{p['job_name']}-{job_id}"),
                             parent_id=parent.id, owner=owner)
        for state in (JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED):
            store.transition(child.id, state, state.value.lower())
        append_row(sdir, row)
    if fitted:
        from scaling.fit_table import load_table
        from scaling.report import run_fits, write_report

        write_report(run_fits(load_table(sdir), n_bootstrap=16, seed=0), f"{sdir}/fit")
        store.transition(parent.id, JobState.SUCCEEDED, "every run ended; fit in fit/")
    return {"id": parent.id, "sweep_dir": sdir, "runs": runs}


REPORT = {
    "prompts": 40, "samples_per_prompt": 1, "rm_heldout_comparisons": 120, "rm_heldout_accuracy": 0.8992,
    "rm_heldout_loss": 0.31, "gold_prompts": 40, "gold_note": "", "ppo_win_rate_vs_sft": 0.7525,
    "gold_by_family": {"reverse": {"prompts": 20, "sft": 0.41, "ppo": 0.66},
                       "uppercase": {"prompts": 20, "sft": 0.52, "ppo": 0.71}},
    "policies": {"sft": {"gold": 0.465, "reward": -0.12, "kl": 0.0}, "ppo": {"gold": 0.685, "reward": 1.3, "kl": 0.93}},
}


def make_pipeline(cfg, name: str = "igpt", owner: str = "alice") -> str:
    """A finished InstructGPT pipeline with its three stages and a report; returns the pipeline's id."""
    from data.storage import Storage
    from orchestrator.instructgpt import RECORD_KIND, STAGE_KIND, STAGES, write_state

    store = JobStore(cfg.job_store)
    storage = Storage(cfg.storage, dict(cfg.storage_options))
    pdir = safe_join(cfg.storage, "pipelines", name)
    storage.makedirs(pdir)
    parent = store.submit(name, RECORD_KIND, {"pipeline_dir": pdir}, 0,
                          {"workers": 0, "cpus_per_worker": 0, "gpus_per_worker": 0}, 0,
                          run_dir_for=lambda _id: pdir, owner=owner)
    store.transition(parent.id, JobState.STARTING, "pipeline submitted")
    store.transition(parent.id, JobState.RUNNING, "stage sft")
    metrics = {"sft": {"loss": 1.2, "held_out_loss": 1.4}, "rm": {"loss": 0.3, "held_out_accuracy": 0.9},
               "ppo": {"loss": 0.05, "reward": 1.3, "kl": 0.93}}
    state = {"stages": {}}
    for stage in STAGES:
        child = store.submit(f"{name}-{stage}", STAGE_KIND, {"name": f"{name}-{stage}"}, 0,
                             {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}, 0,
                             run_dir_for=lambda job_id, s=stage: f"{pdir}/{s}", parent_id=parent.id, owner=owner)
        for s in (JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED):
            store.transition(child.id, s, s.value.lower())
        store.update(child.id, step=20, metrics=metrics[stage])
        state["stages"][stage] = {"job_id": child.id, "state": "SUCCEEDED", "step": 20, "run_dir": f"{pdir}/{stage}"}
    write_state(storage, pdir, state)
    store.update(parent.id, report=REPORT)
    store.transition(parent.id, JobState.SUCCEEDED, f"every stage done; report in {pdir}/report.json")
    return parent.id
