"""Which samples each rank reads at each step, and how to resume exactly.

The training token stream is cut into windows of ``seq_len + 1`` tokens
(inputs and shifted targets) at stride ``seq_len``. The last
``held_out_tokens`` of the stream are never used for training; evaluation
reads windows from there.

The order of training windows is a fixed permutation per epoch, seeded by
(seed, epoch). It is never materialised: ``IndexPermutation`` computes
``perm[i]`` on the fly with a keyed Feistel network over the next power of
four and cycle-walking back into [0, n), so a rank needs O(batch) memory and
time per step however many windows the corpus has. The data position is one
integer: how many samples the whole job has consumed. Sample ``p`` is window
``perm(epoch = p // n)[p % n]``, so
a resumed job continues with exactly the samples an uninterrupted job would
have read next, whatever the number of ranks: each step takes the next
``samples_per_step`` positions and rank ``r`` of ``dp`` takes its contiguous
share of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
FEISTEL_ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class IndexPermutation:
    """A seeded bijection of [0, n), evaluated per index: ``perm(np.array([i, j]))``.

    A balanced Feistel network on 2h bits (4**h >= n, so the domain is under 4n) with
    ``FEISTEL_ROUNDS`` keyed splitmix64 rounds is a permutation of [0, 4**h); indices that land at
    or past n are sent through it again (cycle-walking) until they fall inside, which keeps it a
    permutation of [0, n). Expected rounds per index: under 4 passes.
    """

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = int(n)
        self.half = max(1, (max(1, self.n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        rng = np.random.default_rng([seed, epoch])
        self.keys = rng.integers(0, np.iinfo(np.int64).max, size=FEISTEL_ROUNDS, dtype=np.int64).astype(np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, idx) -> np.ndarray:
        x = np.asarray(idx, dtype=np.uint64).copy()
        n = np.uint64(self.n)
        out = self._encrypt(x)
        walk = out >= n
        while walk.any():
            out[walk] = self._encrypt(out[walk])
            walk = out >= n
        return out.astype(np.int64)


@dataclass(frozen=True)
class DataState:
    """Saved in every checkpoint manifest."""

    position: int
    """Samples consumed by the whole job so far."""
    seed: int
    n_windows: int
    """Training windows per epoch (a resume on different data is refused)."""

    def to_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "n_windows": self.n_windows}

    @classmethod
    def from_dict(cls, d: dict) -> "DataState":
        return cls(int(d["position"]), int(d["seed"]), int(d["n_windows"]))

    def check(self, n: int, seed: int, what: str) -> None:
        """Refuse a resume on other data: ``n`` samples per epoch (windows or records) and ``seed`` must match."""
        if self.n_windows != n or self.seed != seed:
            raise ValueError(f"checkpoint was made on different data ({what} {self.n_windows}, seed {self.seed}) "
                             f"than this run ({what} {n}, seed {seed})")


class DataPlan:
    def __init__(self, tokens: np.ndarray, seq_len: int, held_out_tokens: int, seed: int):
        if held_out_tokens >= len(tokens) // 2:
            raise ValueError(f"eval.held_out_tokens ({held_out_tokens}) must be under half the corpus "
                             f"({len(tokens)} tokens)")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.train_end = len(tokens) - held_out_tokens
        self.n_windows = (self.train_end - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"data: the corpus has {self.train_end} training tokens, fewer than seq_len+1 "
                             f"({seq_len + 1}); use a larger corpus or a smaller data.seq_len")
        self.n_held_out = max(0, (held_out_tokens - 1) // seq_len)
        self._perm: IndexPermutation | None = None
        self._perm_epoch = -1
        self._last_first: int | None = None

    def _permutation(self, epoch: int) -> IndexPermutation:
        if self._perm is None or self._perm_epoch != epoch:
            self._perm, self._perm_epoch = IndexPermutation(self.n_windows, self.seed, epoch), epoch
        return self._perm

    def windows_of(self, positions) -> np.ndarray:
        """Window indices (into the training region) of global sample ``positions``: (len,) int64."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        epochs, offsets = np.divmod(pos, self.n_windows)
        out = np.empty(len(pos), dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._permutation(int(epoch))(offsets[sel])
        return out

    def window_of(self, position: int) -> int:
        """Window index (into the training region) of global sample ``position``."""
        return int(self.windows_of([position])[0])

    def _window(self, start: int) -> np.ndarray:
        return self.tokens[start:start + self.seq_len + 1]

    def rank_positions(self, position: int, samples_per_step: int, rank: int, dp: int) -> range:
        """Global sample positions rank ``rank`` reads in the step starting at ``position``."""
        per_rank = samples_per_step // dp
        start = position + rank * per_rank
        return range(start, start + per_rank)

    def batch(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each (B, seq_len) int64, for global sample positions.

        When the token stream can read ahead, the same positions one stride later (the stride between
        this call and the previous one: a rank's next step) are read in the background meanwhile.
        """
        positions = list(positions)
        rows = np.stack([self._window(int(w) * self.seq_len) for w in self.windows_of(positions)]).astype(np.int64)
        if positions and hasattr(self.tokens, "prefetch"):
            first, last = positions[0], self._last_first
            self._last_first = first
            if last is not None and first > last:
                ahead = self.windows_of([p + first - last for p in positions]) * self.seq_len
                self.tokens.prefetch([(int(s), int(s) + self.seq_len + 1) for s in ahead])
        return rows[:, :-1], rows[:, 1:]

    def held_out_batch(self, index: int, batch_size: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The index-th batch of held-out windows (fixed order), or None past the end."""
        lo = index * batch_size
        if self.n_held_out == 0 or lo >= self.n_held_out:
            return None
        ids = range(lo, min(lo + batch_size, self.n_held_out))
        rows = np.stack([self._window(self.train_end + i * self.seq_len) for i in ids]).astype(np.int64)
        return rows[:, :-1], rows[:, 1:]

    def held_out_keyed(self, index: int, batch_size: int) -> list[tuple[np.ndarray, int, int]] | None:
        """``held_out_batch``'s inputs as (row, key, epoch 0) with keys past the training windows, for tasks that
        draw a mask or noise per (key, epoch): the held-out draws are fixed and never a training window's."""
        b = self.held_out_batch(index, batch_size)
        if b is None:
            return None
        first = self.n_windows + index * batch_size
        return [(row, first + i, 0) for i, row in enumerate(b[0])]

    def state(self, position: int) -> DataState:
        return DataState(position, self.seed, self.n_windows)

    def check_resume(self, state: DataState) -> None:
        state.check(self.n_windows, self.seed, "windows")


class ItemOrder:
    """The same scheme over a list of ``n`` records (demonstrations, comparisons, prompts).

    Global sample position ``p`` is record ``perm(epoch = p // n)[p % n]``;
    the permutation is seeded by (seed, epoch). A ``DataState`` with
    ``n_windows = n`` saves and checks the position.
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("no records to read")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, np.arange(0)

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            self._perm, self._epoch = np.random.default_rng([self.seed, epoch]).permutation(self.n), epoch
        return int(self._perm[offset])

    def rank_indices(self, position: int, per_step: int, rank: int, world: int) -> list[int]:
        """Record indices rank ``rank`` of ``world`` reads in the step starting at ``position``."""
        share = per_step // world
        return [self.index(p) for p in range(position + rank * share, position + (rank + 1) * share)]

    def state(self, position: int) -> DataState:
        return DataState(position, self.seed, self.n)

    def check_resume(self, state: DataState) -> None:
        state.check(self.n, self.seed, "records")
