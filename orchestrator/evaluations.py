"""Checkpoint evaluation, as the controller runs it: one task per new complete checkpoint, the best one marked.

Each task reserves ``workers.eval_cpus`` CPUs, and a GPU when the job's ranks had one: the scheduler sees
what it holds, and it runs at the speed of its own device instead of squeezed between training ranks.
With ``eval.shards`` > 1 the task only drives that many shard actors (``workers.sharded_eval``), gang-placed,
each reserving as much.

A part of ``orchestrator.controller.Controller`` (a mixin: it uses the controller's ``store``, ``storage``,
``cluster``, ``active`` and ``eval_jobs``).
"""
from __future__ import annotations

import json
import logging
import math

import ray

log = logging.getLogger(__name__)


class CheckpointEvaluations:
    # ------------------------------------------------------------------ checkpoint evaluation

    def _evaluate_checkpoints(self) -> None:
        """One evaluation in flight per job; a job leaves the list once every checkpoint it kept is evaluated."""
        from workers.checkpoint import list_checkpoints
        from workers.evaluator import evaluate_checkpoint

        for job_id, inflight in list(self.eval_jobs.items()):
            for path, ref in list(inflight.items()):
                ready, _ = ray.wait([ref], timeout=0)
                if ready:
                    inflight.pop(path)
                    try:
                        self._record_eval(job_id, ray.get(ref))
                    except Exception as err:  # e.g. retention removed the checkpoint first
                        log.warning("evaluation of %s skipped: %s", path, str(err).strip().splitlines()[-1])
                        self._skipped.add(path)
            if inflight:
                continue
            rec = self.store.get(job_id)
            done = {e.checkpoint for e in rec.evals} | self._skipped
            todo = [c for c in list_checkpoints(self.storage, rec.run_dir)
                    if c.path not in done and "model.safetensors" in c.manifest.get("files", {})]
            if not todo:
                if job_id not in self.active:
                    self.eval_jobs.pop(job_id)
                continue
            ckpt = todo[0]
            cpus = self.cluster.workers.eval_cpus
            gpus = 1 if float(rec.resources.get("gpus_per_worker") or 0) > 0 else 0
            shards = rec.spec.get("eval", {}).get("shards", 1)
            if self.pool.members and (ray.available_resources().get("GPU" if gpus else "CPU", 0)
                                      < (gpus or cpus) * shards):
                self.pool.release(1)  # an idle pool member gives its room to the evaluation
            # Sharded: this task only drives the shard actors, which reserve cpus and gpus each.
            held = (0, 0) if shards > 1 else (cpus, gpus)
            task = ray.remote(evaluate_checkpoint).options(num_cpus=held[0], num_gpus=held[1], max_retries=1)
            inflight[ckpt.path] = task.remote(self.storage, rec.run_dir, ckpt.path, ckpt.step,
                                              rec.spec.get("eval", {}).get("batches", 8),
                                              rec.spec.get("train", {}).get("micro_batch", 8),
                                              max(1, int(cpus)), gpus)

    # ------------------------------------------------------------------ evaluation results

    def _record_eval(self, job_id: str, result: dict) -> None:
        # Stage kinds report no perplexity (rm, ppo): NaN makes the store keep None rather than exp(loss).
        ppl = result.get("perplexity")
        self.store.add_eval(job_id, result["checkpoint"], result["step"], result["loss"],
                            float("nan") if ppl is None else ppl,
                            extra={"tokens": result.get("tokens"), **(result.get("extra") or {})})
        rec = self.store.get(job_id)
        with self.storage.fs.open(f"{rec.run_dir}/evals.jsonl.tmp", "w") as f:
            for e in rec.evals:
                f.write(json.dumps(e.to_dict()) + "\n")
        self.storage.fs.mv(f"{rec.run_dir}/evals.jsonl.tmp", f"{rec.run_dir}/evals.jsonl")
        finite = [e for e in rec.evals if e.loss is not None and math.isfinite(e.loss)]
        if not finite:
            return  # a NaN or infinite evaluation loss is never the best
        best = min(finite, key=lambda e: e.loss)
        if rec.best_checkpoint != best.checkpoint:
            self.storage.write_json(f"{rec.run_dir}/best_checkpoint.json",
                                    {"path": best.checkpoint, "step": best.step, "loss": best.loss})
            self.store.update(job_id, best_checkpoint=best.checkpoint)
