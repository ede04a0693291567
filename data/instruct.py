"""A built-in instruction task with a gold judge: RLHF data without a download.

Every prompt is one short instruction whose correct answer a program knows
("Reverse: cat dog sun" -> "sun dog cat"), so the whole InstructGPT recipe can
run and be *measured* on a laptop: the gold judge plays the human labeller
(it ranks responses for the reward model) and the final referee (it scores
the SFT and PPO policies on held-out prompts).

Prompts and answers are a few dozen bytes, sized for byte-level tiny models:

    Reverse: cat dog sun\\n        ->  sun dog cat
    Sort: 42 7 19\\n               ->  7 19 42
    Add: 23+58\\n                  ->  81
    Upper: cat dog\\n              ->  CAT DOG
    Count: cat dog sun\\n          ->  3
    Max: 4 17 9\\n                 ->  17
    Initials: cat dog sun\\n       ->  cds
    Repeat 3: cat\\n               ->  cat cat cat

The prompt text ends with a newline (``PROMPT_END``) and the response follows
directly; the tokenizer's eos token ends it.

Train and held-out prompts are disjoint by construction: a prompt belongs to
the held-out split exactly when a hash of its text falls in the first
``heldout_percent`` of 100 buckets, whatever seed generated it.

The judge gives partial credit in [0, 1] (exact answer = 1), so responses of
graded quality rank strictly and the reward model has signal to learn from.
"""
from __future__ import annotations

import difflib
import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from data.records import Comparison, Demonstration

PROMPT_END = "\n"
WORDS = (
    "red", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star",
    "rain", "snow", "leaf", "rock", "milk", "cake", "ship", "road", "lamp", "door",
    "bell", "frog", "wolf", "bear", "lion", "king", "gold", "salt", "wind", "fire",
    "ice", "sky", "sea", "hat", "cup", "pen", "box", "key", "map", "egg",
)
FAMILIES = ("reverse", "sort", "add", "upper", "count", "max", "initials", "repeat")
# Prompt prefix per family; the judge parses prompts by it.
PREFIX = {
    "reverse": "Reverse: ", "sort": "Sort: ", "add": "Add: ", "upper": "Upper: ",
    "count": "Count: ", "max": "Max: ", "initials": "Initials: ", "repeat": "Repeat ",
}
NUMERIC = ("add", "count", "max")
SPLITS = ("train", "heldout")

# A sampler draws responses from a model: (prompts, n per prompt) -> n texts per prompt.
Sampler = Callable[[Sequence[str], int], Sequence[Sequence[str]]]


@dataclass(frozen=True)
class TaskConfig:
    """Which instructions the generator makes and how the prompt space is split."""

    seed: int = 0
    """Seed of the prompt generator; the same seed gives the same prompts."""
    heldout_percent: int = 10
    """Hash buckets (out of 100) reserved for held-out prompts."""
    families: tuple[str, ...] = FAMILIES
    """Instruction families to draw from, uniformly."""

    def __post_init__(self) -> None:
        if not 0 < self.heldout_percent < 100:
            raise ValueError(f"heldout_percent must be in 1..99, got {self.heldout_percent}")
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown or not self.families:
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {self.families}")


# ----------------------------------------------------------------------------- prompts


def split_of(prompt: str, heldout_percent: int = 10) -> str:
    """'heldout' or 'train', from a hash of the prompt text alone."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    return "heldout" if bucket < heldout_percent else "train"


def _random_prompt(family: str, rng: random.Random) -> str:
    words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    numbers = lambda lo, hi: " ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    body = {
        "reverse": lambda: words(2, 4),
        "sort": lambda: numbers(3, 4),
        "add": lambda: f"{rng.randint(0, 99)}+{rng.randint(0, 99)}",
        "upper": lambda: words(1, 3),
        "count": lambda: words(1, 6),
        "max": lambda: numbers(2, 4),
        "initials": lambda: words(2, 5),
        "repeat": lambda: f"{rng.randint(2, 3)}: {words(1, 2)}",
    }[family]()
    return PREFIX[family] + body + PROMPT_END


def make_prompts(n: int, split: str = "train", cfg: TaskConfig = TaskConfig()) -> list[str]:
    """``n`` distinct prompts of one split, deterministic in ``cfg.seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # Each split draws from its own stream so asking for more train prompts
    # never changes the held-out ones.
    rng = random.Random(f"{cfg.seed}:{split}")
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * (n + 10):
            raise ValueError(f"could not draw {n} distinct {split} prompts; ask for fewer")
        prompt = _random_prompt(rng.choice(cfg.families), rng)
        if prompt in seen or split_of(prompt, cfg.heldout_percent) != split:
            continue
        seen.add(prompt)
        out.append(prompt)
    return out


# ----------------------------------------------------------------------------- gold answers and judge


def parse(prompt: str) -> tuple[str, list[str], int]:
    """(family, argument tokens, repeat count) of a prompt; ValueError if it is not one of ours."""
    text = prompt[:-len(PROMPT_END)] if prompt.endswith(PROMPT_END) else prompt
    for family, prefix in PREFIX.items():
        if not text.startswith(prefix):
            continue
        body = text[len(prefix):]
        if family == "add":
            a, _, b = body.partition("+")
            if a.isdigit() and b.isdigit():
                return family, [a, b], 1
        elif family == "repeat":
            count, _, rest = body.partition(": ")
            if count.isdigit() and rest.split():
                return family, rest.split(), int(count)
        elif body.split():
            return family, body.split(), 1
    raise ValueError(f"not a built-in instruction prompt: {prompt!r}")


def gold_answer(prompt: str) -> str:
    """The one correct response to a built-in prompt."""
    family, args, count = parse(prompt)
    if family == "reverse":
        return " ".join(reversed(args))
    if family == "sort":
        return " ".join(str(x) for x in sorted(int(a) for a in args))
    if family == "add":
        return str(int(args[0]) + int(args[1]))
    if family == "upper":
        return " ".join(args).upper()
    if family == "count":
        return str(len(args))
    if family == "max":
        return str(max(int(a) for a in args))
    if family == "initials":
        return "".join(a[0] for a in args)
    return " ".join(" ".join(args) for _ in range(count))  # repeat


def _normalise(text: str) -> str:
    return " ".join(text.split())


def judge(prompt: str, response: str) -> float:
    """Gold score of ``response`` in [0, 1]; 1 exactly when it is the correct answer.

    Partial credit (below 1 for any wrong answer) rewards properties a grader
    can check, so that responses of graded quality rank:

    * add, count, max: a number, scored by closeness to the answer (at most 0.5);
    * sort: the right numbers (multiset F1 with the prompt's) times how much
      of the order is right (share of ascending neighbours);
    * initials: character similarity; other texts: the mean of word-level and
      character-level similarity (difflib ratio), so a swapped pair of words
      scores above a missing word, which scores above a garbled answer.
    """
    family, args, _ = parse(prompt)
    gold, got = gold_answer(prompt), _normalise(response)
    if got == gold:
        return 1.0
    if family in NUMERIC:
        if not got.isdigit():
            return 0.0
        err = abs(int(got) - int(gold))
        return 0.5 * max(0.0, 1.0 - err / (int(gold) + 1))
    if family == "sort":
        toks = got.split()
        overlap = sum((Counter(toks) & Counter(args)).values())
        f1 = 2 * overlap / (len(toks) + len(args))
        nums = [int(t) for t in toks if t.isdigit()]
        ordered = sum(a <= b for a, b in zip(nums, nums[1:])) / (len(nums) - 1) if len(nums) > 1 else 0.0
        return min(0.99, f1 * (0.5 + 0.5 * ordered))
    chars = difflib.SequenceMatcher(None, gold, got, autojunk=False).ratio()
    if family == "initials":  # one word: only characters carry partial credit
        return min(0.99, chars)
    words = difflib.SequenceMatcher(None, gold.split(), got.split(), autojunk=False).ratio()
    return min(0.99, 0.5 * words + 0.5 * chars)


# ----------------------------------------------------------------------------- demonstrations and comparisons


def demonstrations(n: int, split: str = "train", cfg: TaskConfig = TaskConfig(),
                   noise: float = 0.0) -> list[Demonstration]:
    """``n`` (prompt, answer) pairs, the SFT data: gold answers, except a ``noise`` share of
    corrupted ones (1 to 3 edits), as from careless demonstrators.

    Noisy demonstrations make an SFT model that is imperfect in a way a reward
    model can see, leaving room for RLHF to improve on it.
    """
    rng = random.Random(f"{cfg.seed}:demonstrations:{split}")
    out = []
    for p in make_prompts(n, split, cfg):
        gold = gold_answer(p)
        noisy = rng.random() < noise
        out.append(Demonstration(p, corrupt(p, gold, rng, rng.randint(1, 3)) if noisy else gold))
    return out


def corrupt(prompt: str, answer: str, rng: random.Random, n_edits: int) -> str:
    """``answer`` to ``prompt`` after ``n_edits`` random edits: more edits, lower quality (on average).

    Half of the material an edit brings in comes from the prompt itself (its
    numbers, words, or letters): such near misses look plausible, so a reward
    model cannot rank by "uses the prompt's symbols" alone.
    """
    family, args, _ = parse(prompt)
    if family in NUMERIC:
        value = int(answer)
        listed = [int(a) for a in args if a.isdigit()]
        for _ in range(n_edits):
            op = rng.randrange(5 if listed else 4)
            if op == 4:
                value = rng.choice(listed)
            elif op == 0:
                value += rng.choice((-1, 1))
            elif op == 1:
                value += rng.choice((-10, 10))
            elif op == 2:
                value = int(str(value)[::-1])
            else:
                value = rng.randint(0, 199)
            value = abs(value)
        return str(value)
    chars = family == "initials"
    toks = list(answer) if chars else answer.split()
    if chars:
        near, far = [c for c in prompt.lower() if c.isalpha()], list("abcdefghijklmnopqrstuvwxyz")
    elif family == "upper":
        near, far = args + [a.upper() for a in args], [w.upper() for w in WORDS] + list(WORDS)
    else:
        near, far = list(args), list(WORDS) + [str(i) for i in range(100)]
    pick = lambda: rng.choice(near if rng.random() < 0.5 else far)  # noqa: E731
    for _ in range(n_edits):
        op = rng.randrange(5)
        if op == 0 and len(toks) >= 2:                 # swap two neighbours
            i = rng.randrange(len(toks) - 1)
            toks[i], toks[i + 1] = toks[i + 1], toks[i]
        elif op == 1 and toks:                         # replace one
            toks[rng.randrange(len(toks))] = pick()
        elif op == 2 and len(toks) >= 2:               # drop one
            del toks[rng.randrange(len(toks))]
        elif op == 3:                                  # insert one
            toks.insert(rng.randrange(len(toks) + 1), pick())
        elif toks and family == "upper":               # lowercase one
            i = rng.randrange(len(toks))
            toks[i] = toks[i].lower()
        elif toks:                                     # duplicate one
            i = rng.randrange(len(toks))
            toks.insert(i, toks[i])
    return ("" if chars else " ").join(toks)


def _pick_distinct(candidates: list[str], prompt: str, k: int, seen: dict[float, str],
                   rng: random.Random, min_gap: float) -> None:
    """Add candidates to ``seen`` (score -> text) until it holds ``k`` scores at least ``min_gap`` apart."""
    rng.shuffle(candidates)
    for text in candidates:
        if len(seen) >= k:
            return
        score = round(judge(prompt, text), 6)
        if len(text) <= 48 and all(abs(score - s) >= max(min_gap, 1e-6) for s in seen):
            seen[score] = text


def comparisons(n: int, k: int = 4, split: str = "train", cfg: TaskConfig = TaskConfig(),
                sampler: Sampler | None = None, model_share: float = 0.5, n_samples: int | None = None,
                seed: int = 0, min_gap: float = 0.0) -> list[Comparison]:
    """``n`` prompts with ``k`` responses each, ranked best first by the judge.

    Responses have distinct judge scores, so each ranking is strict. With a
    ``sampler`` (a model), up to ``model_share`` of each prompt's responses
    are picked among ``n_samples`` (default 2k) of the model's own samples
    (the InstructGPT setting: labellers rank model outputs, and the reward
    model must judge the policy's own kind of output) and corrupted gold
    answers fill the rest; without one, all are
    corrupted gold answers of graded quality (1 to 6 edits, or the gold answer
    itself). Scores of one prompt's responses differ by at least ``min_gap``
    (near-ties carry little signal, for a labeller or a reward model). A prompt
    whose candidates give fewer than ``k`` such scores keeps fewer responses
    (never fewer than 2).
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    prompts = make_prompts(n, split, cfg)
    rng = random.Random(f"{cfg.seed}:{seed}:comparisons:{split}")
    n_model = int(round(k * model_share)) if sampler is not None else 0
    samples = sampler(prompts, n_samples or 2 * k) if n_model else [[] for _ in prompts]
    out: list[Comparison] = []
    for prompt, model_texts in zip(prompts, samples):
        gold = gold_answer(prompt)
        seen: dict[float, str] = {}
        _pick_distinct([_normalise(t) for t in model_texts], prompt, n_model, seen, rng, min_gap)
        for _ in range(4):  # a few rounds of fresh corruptions if scores collide
            pool = [gold] + [corrupt(prompt, gold, rng, rng.randint(1, 6)) for _ in range(3 * k)]
            _pick_distinct(pool, prompt, k, seen, rng, min_gap)
            if len(seen) >= k:
                break
        if len(seen) < 2:
            continue
        texts = list(seen.values())
        rng.shuffle(texts)  # the stored order carries no information; the ranking does
        ranking = sorted(range(len(texts)), key=lambda i: -judge(prompt, texts[i]))
        out.append(Comparison(prompt, tuple(texts), tuple(ranking)))
    return out
