"""The InstructGPT pipeline's final report: how much the three stages bought, on held-out data.

Given the SFT, RM and PPO run directories, it measures

* the reward model's pairwise accuracy (and ranking loss) on the held-out
  comparisons, recomputed with the RM the PPO stage used;
* for the SFT policy, the PPO policy and (when the run kept one) the PPO EMA
  policy, on the held-out evaluation prompts: the gold judge's mean score
  (``data.instruct.judge``, only for prompts of the built-in task), the mean
  reward-model score and the KL to the reference (the SFT policy) in nats per
  sequence;
* the win-rate of PPO (and EMA) over SFT judged per prompt by the gold judge
  (ties count half), and the gold means per instruction family;
* for evaluation prompts whose rows carry ``reference`` (a user's own task:
  one string or a list of acceptable answers), the reference judge: each
  policy's exact match and token F1 against the best-matching reference
  (SQuAD's normalisation: lower case, no punctuation or articles), and the
  win-rate of PPO (and EMA) over SFT by per-prompt F1, ties half.

``judged_prompts`` says how many prompts each judge covered.

It writes nothing: the controller stores the returned dict as
``<pipeline_dir>/report.json``. Sampling and scoring reuse the single-process
reference's functions (``workers.rlhf.steps``), so the figures mean the
same thing in both.
"""
from __future__ import annotations

import re
import string
import time
from collections import Counter

import torch

from data import instruct
from data.rlhf_files import read_comparisons, read_eval_prompts
from data.storage import Storage
from models.generate import SamplingConfig
from workers.rlhf.datasets import comparison_tokens, held_out_count
from workers.rlhf.steps import gold_scores, reward_and_kl, rm_accuracy, sample_responses, win_rate
from workers.weights import load_policy, load_reward_model, run_tokenizer


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _family(prompt: str) -> str | None:
    """The built-in instruction family of a prompt, or None for any other prompt."""
    try:
        return instruct.parse(prompt)[0]
    except ValueError:
        return None


def gold_summary(prompts: list[str], responses: dict[str, list[list[str]]]) -> dict:
    """Gold means, per-family means and win-rates over SFT for each policy's sampled responses.

    ``responses``: policy name -> per prompt, its sampled texts; "sft" must be one of them. Only
    prompts of the built-in task are judged; the rest are counted in ``gold_note``.
    """
    judged = [i for i, p in enumerate(prompts) if _family(p) is not None]
    skipped = len(prompts) - len(judged)
    note = None
    if skipped:
        note = (f"{skipped} of {len(prompts)} evaluation prompts are not built-in task prompts; "
                + ("no gold judge for any of them" if not judged else "gold figures cover the rest only"))
    if not judged:
        out = {"gold_prompts": 0, "gold_note": note, "gold_by_family": None}
        for name in responses:
            out[f"{name}_gold"] = None
            if name != "sft":
                out[f"{name}_win_rate_vs_sft"] = None
        return out
    kept = [prompts[i] for i in judged]
    scores = {name: gold_scores(kept, [rs[i] for i in judged]) for name, rs in responses.items()}
    out: dict = {"gold_prompts": len(judged), "gold_note": note}
    for name, s in scores.items():
        out[f"{name}_gold"] = _mean(s)
        if name != "sft":
            out[f"{name}_win_rate_vs_sft"] = win_rate(s, scores["sft"])
    families: dict[str, list[int]] = {}
    for j, p in enumerate(kept):
        families.setdefault(_family(p), []).append(j)
    out["gold_by_family"] = {f: {"prompts": len(idx), **{name: _mean([s[j] for j in idx]) for name, s in scores.items()}}
                             for f, idx in sorted(families.items())}
    return out


def normalize_answer(text: str) -> list[str]:
    """Tokens of an answer as SQuAD's judge compares them: lower case, no punctuation or articles."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


_PUNCT = frozenset(string.punctuation)


def exact_match(response: str, references: tuple[str, ...]) -> float:
    """1.0 when the normalised response equals a normalised reference, else 0.0."""
    got = normalize_answer(response)
    return float(any(got == normalize_answer(r) for r in references))


def token_f1(response: str, references: tuple[str, ...]) -> float:
    """Best token F1 (harmonic mean of token precision and recall) of the response over the references."""
    got = normalize_answer(response)
    best = 0.0
    for ref in references:
        want = normalize_answer(ref)
        if not got or not want:
            best = max(best, float(got == want))
            continue
        common = sum((Counter(got) & Counter(want)).values())
        if common:
            p, r = common / len(got), common / len(want)
            best = max(best, 2 * p * r / (p + r))
    return best


def reference_summary(references: list[tuple[str, ...] | None], responses: dict[str, list[list[str]]]) -> dict:
    """The reference judge: per policy, mean exact match and token F1 over the prompts with references
    (a prompt's score is the mean over its samples), and win-rates over SFT by per-prompt F1, ties half.

    ``responses``: policy name -> per prompt, its sampled texts; "sft" must be one of them. Prompts
    without references are left out; with none at all every figure is None.
    """
    judged = [i for i, r in enumerate(references) if r]
    out: dict = {"reference_prompts": len(judged), "metric": "token_f1", "policies": {}}
    f1: dict[str, list[float]] = {}
    for name, rs in responses.items():
        em = [_mean([exact_match(x, references[i]) for x in rs[i]]) for i in judged]
        f1[name] = [_mean([token_f1(x, references[i]) for x in rs[i]]) for i in judged]
        out["policies"][name] = {"exact_match": _mean(em), "f1": _mean(f1[name])}
    for name in responses:
        if name != "sft":
            out[f"{name}_win_rate_vs_sft"] = win_rate(f1[name], f1["sft"]) if judged else None
    return out


def _tail(rows: list) -> list:
    """The held-out tail the stages split off a dataset given without a held-out file."""
    return rows[-held_out_count(len(rows)):]


def _rm_heldout(rm, tok, uri: str, tail: bool) -> tuple[list, int, dict]:
    """(comparisons kept, comparisons too long, accuracy and loss) of the reward model on held-out rankings."""
    comps = read_comparisons(uri)
    if tail:
        comps = _tail(comps)
    # As the RM stage does: a comparison with a response too long for the model is left out.
    longest = [comparison_tokens(tok, c) for c in comps]
    too_long = sum(n > rm.decoder.cfg.seq_len for n in longest)
    comps = [c for c, n in zip(comps, longest) if n <= rm.decoder.cfg.seq_len]
    if not comps:
        raise ValueError(f"{uri}: no held-out comparison fits the reward model's {rm.decoder.cfg.seq_len} tokens")
    return comps, too_long, rm_accuracy(rm, tok, comps)


def _fitting_prompts(uri: str, tail: bool, tok, seq_len: int, max_new_tokens: int, max_prompts: int | None
                     ) -> tuple[list[tuple[str, str | None]], int]:
    """The (prompt, reference) rows that leave ``max_new_tokens`` in the context, and how many did not."""
    rows = read_eval_prompts(uri)
    if tail:
        rows = _tail(rows)
    fitting = [(p, r) for p, r in rows if len(tok.encode(p)) <= seq_len - max_new_tokens]
    too_long = len(rows) - len(fitting)
    fitting = fitting[:max_prompts] if max_prompts is not None else fitting
    if not fitting:
        raise ValueError(f"{uri}: no evaluation prompt leaves room for {max_new_tokens} new tokens "
                         f"in the model's {seq_len}")
    return fitting, too_long


def pipeline_report(storage: Storage, sft_run: str, rm_run: str, ppo_run: str, eval_prompts_uri: str,
                    rm_heldout_uri: str, samples_per_prompt: int = 4, seed: int = 0, max_new_tokens: int = 40,
                    max_prompts: int | None = None, rm_heldout_tail: bool = False, eval_prompts_tail: bool = False
                    ) -> dict:
    """Evaluate the pipeline's models on held-out data; returns the report (writes nothing).

    ``*_tail``: the file is the whole dataset and its held-out tail is used, as the stages do when
    no held-out file is given. ``max_prompts``: the first N evaluation prompts (None = all).
    Prompts too long to leave ``max_new_tokens`` in the model's context are left out (and counted).
    """
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    tok = run_tokenizer(storage, sft_run)
    sft = load_policy(storage, sft_run)
    rm = load_reward_model(storage, rm_run)
    policies = {"sft": sft, "ppo": load_policy(storage, ppo_run)}
    ppo_spec = storage.read_json(f"{ppo_run.rstrip('/')}/spec.json")
    if ppo_spec.get("rlhf", {}).get("ppo", {}).get("ema_decay") is not None:
        policies["ema"] = load_policy(storage, ppo_run, which="ema")

    t0 = time.perf_counter()
    comps, comps_too_long, rm_eval = _rm_heldout(rm, tok, rm_heldout_uri, rm_heldout_tail)
    seconds["rm_accuracy"] = time.perf_counter() - t0

    fitting, too_long = _fitting_prompts(eval_prompts_uri, eval_prompts_tail, tok, sft.cfg.seq_len, max_new_tokens,
                                         max_prompts)
    prompts, references = [p for p, _ in fitting], [r for _, r in fitting]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id)
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    responses = {name: sample_responses(model, tok, prompts, samples_per_prompt, sampling, generator)
                 for name, model in policies.items()}
    seconds["sampling"] = time.perf_counter() - t0
    gold = gold_summary(prompts, responses)
    judge = reference_summary(references, responses)
    t0 = time.perf_counter()
    scored = {name: reward_and_kl(model, sft, rm, tok, prompts, sampling, generator)
              for name, model in policies.items()}
    seconds["reward_and_kl"] = time.perf_counter() - t0

    report = {
        "runs": {"sft": sft_run, "rm": rm_run, "ppo": ppo_run},
        "data": {"eval_prompts": eval_prompts_uri, "rm_heldout": rm_heldout_uri,
                 "eval_prompts_tail": eval_prompts_tail, "rm_heldout_tail": rm_heldout_tail},
        "prompts": len(prompts),
        "prompts_too_long": too_long,
        "samples_per_prompt": samples_per_prompt,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "rm_heldout_comparisons": len(comps),
        "rm_heldout_too_long": comps_too_long,
        "rm_heldout_accuracy": rm_eval["accuracy"],
        "rm_heldout_loss": rm_eval["loss"],
        "gold_prompts": gold["gold_prompts"],
        "gold_note": gold["gold_note"],
        "ppo_win_rate_vs_sft": gold.get("ppo_win_rate_vs_sft"),
        "gold_by_family": gold["gold_by_family"],
        # How many of the prompts each judge scored (a prompt may have both, or neither).
        "judged_prompts": {"gold": gold["gold_prompts"], "reference": judge["reference_prompts"],
                           "none": sum(1 for p, r in fitting if not r and _family(p) is None)},
        # The reference judge (rows with ``reference``): win-rates by per-prompt token F1, ties half.
        "reference_judge": {k: v for k, v in judge.items() if k != "policies"},
        # Per policy: gold-judge mean, mean RM score, KL to the SFT reference (nats per sequence), and the
        # reference judge's exact match and token F1 (None without references).
        "policies": {name: {"gold": gold[f"{name}_gold"], "reward": scored[name]["reward"],
                            "kl": scored[name]["kl"], **judge["policies"][name]} for name in policies},
    }
    if "ema" in policies:
        report["ema_win_rate_vs_sft"] = gold.get("ema_win_rate_vs_sft")
    seconds["total"] = time.perf_counter() - t_start
    report["seconds"] = round(seconds["total"], 3)
    report["phase_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return report
