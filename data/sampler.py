"""Which samples each rank reads at each step, and how to resume exactly.

The training token stream is cut into windows of ``seq_len + 1`` tokens
(inputs and shifted targets) at stride ``seq_len``. The last
``held_out_tokens`` of the stream are never used for training; evaluation
reads windows from there.

The order of training windows is a fixed permutation per epoch, seeded by
(seed, epoch). The data position is one integer: how many samples the whole
job has consumed. Sample ``p`` is window ``perm(epoch = p // n)[p % n]``, so
a resumed job continues with exactly the samples an uninterrupted job would
have read next, whatever the number of ranks: each step takes the next
``samples_per_step`` positions and rank ``r`` of ``dp`` takes its contiguous
share of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_of(self, position: int) -> int:
        """Window index (into the training region) of global sample ``position``."""
        epoch, offset = divmod(position, self.n_windows)
        return int(self._permutation(epoch)[offset])

    def _window(self, start: int) -> np.ndarray:
        return self.tokens[start:start + self.seq_len + 1]

    def rank_positions(self, position: int, samples_per_step: int, rank: int, dp: int) -> range:
        """Global sample positions rank ``rank`` reads in the step starting at ``position``."""
        per_rank = samples_per_step // dp
        start = position + rank * per_rank
        return range(start, start + per_rank)

    def batch(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each (B, seq_len) int64, for global sample positions."""
        rows = np.stack([self._window(self.window_of(p) * self.seq_len) for p in positions]).astype(np.int64)
        return rows[:, :-1], rows[:, 1:]

    def held_out_batch(self, index: int, batch_size: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The index-th batch of held-out windows (fixed order), or None past the end."""
        lo = index * batch_size
        if self.n_held_out == 0 or lo >= self.n_held_out:
            return None
        ids = range(lo, min(lo + batch_size, self.n_held_out))
        rows = np.stack([self._window(self.train_end + i * self.seq_len) for i in ids]).astype(np.int64)
        return rows[:, :-1], rows[:, 1:]

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
