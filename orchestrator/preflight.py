"""The checks a job passes before it is queued or started that need its storage but no workers.

``submit``, sweeps, pipelines and ``switchyard run`` call ``preflight`` so a
missing corpus, weights folder or dataset file is one clear line at once, not
a failed job later. Neither Ray nor torch is imported here.
"""
from __future__ import annotations

from data.corpus import BUILTIN_STDLIB, resolve_files
from data.storage import Storage, storage_for
from specs.errors import UsageError
from specs.job import JobSpec


def preflight(spec: JobSpec, storage: Storage) -> None:
    """Checks that need the storage but no workers: a missing corpus, weights or dataset file fails
    before anything starts."""
    if spec.data.corpus != BUILTIN_STDLIB and not spec.data.corpus.startswith("builtin:"):
        resolve_files(spec.data.corpus, storage.options)
    weights = {"model.init_from": (spec.model.init_from, ("config.json", "spec.json", "manifest.json"))}
    if spec.kind == "distill":
        weights["distill.teacher"] = (spec.distill.teacher, ("config.json", "spec.json", "manifest.json"))
    if spec.kind == "ppo":
        weights["rlhf.ppo.reward_model"] = (spec.rlhf.ppo.reward_model, ("spec.json", "manifest.json"))
    for field, (path, markers) in weights.items():
        if path and not any(storage_for(path, storage).exists(f"{path.rstrip('/')}/{m}") for m in markers):
            kinds = "a run directory, a checkpoint folder or a Hugging Face folder" if "config.json" in markers \
                else "a run directory or a checkpoint folder"
            raise UsageError(f"{field}: {path} is not {kinds} (none of {', '.join(markers)} there)")
    if spec.kind == "classify":
        from data.labelled import classify_rows

        classify_rows(spec.classify)                  # every labelled row checked before a worker starts
    if spec.kind != "pretrain":
        d = spec.rlhf.data
        for field in ("demonstrations", "demonstrations_heldout", "comparisons", "comparisons_heldout", "prompts",
                      "eval_prompts"):
            uri = getattr(d, field)
            if uri and not storage_for(uri, storage).exists(uri):
                raise UsageError(f"rlhf.data.{field}: no such dataset file {uri}")
