"""Distillation: a student trained with its teacher against the same student trained alone.

In one run, on a local Ray with two ranks per job, through the real job
kinds (``run_job``):

1. a teacher (LLaMA-style "tiny", 4 blocks) is pre-trained for
   ``--teacher-steps`` steps on the built-in corpus;
2. the student (the same width, 2 blocks) is pre-trained alone for
   ``--steps`` steps (kind: pretrain);
3. the same student, from the same random initialisation, batches and
   schedule, is trained with the teacher for the same steps (kind: distill,
   ``init_from_teacher: false`` so that the teacher's loss terms are the only
   difference);
4. with ``--from-layers`` (the default) the same pair again from DistilBERT's
   start, the teacher's layers 0 and 2 (and its embeddings and head): the
   student with the LM loss alone (``alpha_kd: 0, alpha_cos: 0, alpha_lm:
   1``) against the student with the whole triple loss.

The loss weights are options (``--temperature``, ``--alpha-kd``,
``--alpha-lm``, ``--alpha-cos``). The defaults are plain knowledge
distillation, KD + LM at T = 1 without the cosine term: at this size
DistilBERT's 5 KD + 2 LM + 1 cosine at T = 2 (the spec's defaults, made for
BERT-base) did not help (held-out ratios 0.994 and 1.034 from scratch, 1.010
and 1.000 from the teacher's layers, seeds 0 and 1). Each held-out loss
is the student's own next-token cross-entropy on the held-out windows of the
corpus (``eval.batches`` batches), the figure a pretrain run reports. Target
(``met``): in every pair run, the student trained with the teacher has the
lower held-out loss.

Run: ``.venv/bin/python benchmarks/distill.py [--teacher-steps 400] [--steps 150]``.
The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def spec(name: str, steps: int, n_layers: int, args, **overrides):
    """A two-rank tiny LLaMA job; ``overrides`` are dotted spec keys."""
    from specs.job import apply_overrides, validate_spec

    raw = {
        "name": name, "model": {"family": "llama", "preset": "tiny", "n_layers": n_layers},
        "data": {"corpus": "builtin:stdlib", "seq_len": 64, "max_docs": args.max_docs},
        "train": {"steps": steps, "micro_batch": 8, "lr": 3e-3, "warmup_steps": 10, "seed": args.seed},
        "resources": {"workers": 2, "cpus_per_worker": 1, "torch_threads": 1},
        "parallel": {"zero_stage": 1},
        "checkpoint": {"every": steps, "keep": 1},
        "eval": {"held_out_tokens": 16384, "batches": args.eval_batches},
    }
    return validate_spec(apply_overrides(raw, overrides))


def held_out(result: dict) -> float:
    if result["state"] != "SUCCEEDED" or not result.get("final_eval"):
        raise RuntimeError(f"run {result.get('run_dir')} ended {result['state']}: {result.get('error')}")
    return float(result["final_eval"]["held_out_loss"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=150, help="steps of each student")
    ap.add_argument("--max-docs", type=int, default=2000, help="documents of the built-in corpus")
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0, help="distill.temperature (DistilBERT: 2)")
    ap.add_argument("--alpha-kd", type=float, default=1.0, help="distill.alpha_kd (DistilBERT: 5)")
    ap.add_argument("--alpha-lm", type=float, default=1.0, help="distill.alpha_lm (DistilBERT: 2)")
    ap.add_argument("--alpha-cos", type=float, default=0.0, help="distill.alpha_cos (DistilBERT: 1)")
    ap.add_argument("--from-layers", action=argparse.BooleanOptionalAction, default=True,
                    help="also train a student started from the teacher's layers 0 and 2")
    args = ap.parse_args()

    import ray

    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.runner import run_job

    tmp = tempfile.mkdtemp(prefix="sy-distill-")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="bench-distill")
    cfg = ClusterConfig.model_validate({"storage": f"{tmp}/runs", "job_store": f"{tmp}/jobs.db",
                                        "ray": {"namespace": "bench-distill"}})
    t0 = time.time()
    try:
        def run(s):
            return run_job(s, cfg, log=lambda *a, **k: None)

        teacher = run(spec("teacher", args.teacher_steps, 4, args))
        out = {"teacher": {"steps": args.teacher_steps, "n_layers": 4, "held_out_loss": round(held_out(teacher), 4)},
               "loss": {k: getattr(args, k) for k in ("temperature", "alpha_kd", "alpha_lm", "alpha_cos")}}
        alone = held_out(run(spec("alone", args.steps, 2, args)))
        distill = {"kind": "distill", "distill.teacher": teacher["run_dir"], "distill.temperature": args.temperature,
                   "distill.alpha_kd": args.alpha_kd, "distill.alpha_lm": args.alpha_lm,
                   "distill.alpha_cos": args.alpha_cos}
        taught = held_out(run(spec("taught", args.steps, 2, args, **distill, **{"distill.init_from_teacher": False})))
        out.update(student_steps=args.steps, student_n_layers=2, held_out_alone=alone, held_out_distilled=taught,
                   ratio=taught / alone)
        if args.from_layers:
            lm_only = {"distill.alpha_kd": 0.0, "distill.alpha_cos": 0.0, "distill.alpha_lm": 1.0}
            layers_alone = held_out(run(spec("layers-alone", args.steps, 2, args, **{**distill, **lm_only})))
            layers_taught = held_out(run(spec("layers-taught", args.steps, 2, args, **distill)))
            out.update(held_out_layers_alone=layers_alone, held_out_layers_distilled=layers_taught,
                       ratio_layers=layers_taught / layers_alone)
    finally:
        ray.shutdown()
    wins = [out["held_out_distilled"] < out["held_out_alone"]]
    if args.from_layers:
        wins.append(out["held_out_layers_distilled"] < out["held_out_layers_alone"])
    out.update(wall_s=round(time.time() - t0), met=all(wins))
    for k, v in out.items():
        if isinstance(v, float):
            out[k] = round(v, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
