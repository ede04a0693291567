"""Where a job may read and write: the roots cluster.yaml names (``paths.read``, ``paths.write``).

A job reads its corpus (``data.corpus``), its starting weights (``model.init_from``), a teacher
(``distill.teacher``), its RLHF datasets (``rlhf.data.*``) and a PPO reward model
(``rlhf.ppo.reward_model``); it writes its run directory under the storage root and, for the built-in
RLHF task, ``rlhf.data.dir``. Every one of those must lie under
an allowed root: read paths under a read root, a write root or the storage root; write paths under a
write root or the storage root. The CLI checks at submit (and ``run``) time; the ranks check again
before they read or write anything, with the roots the worker group's ``Storage`` carries.

Paths are compared after normalisation: ``..`` is folded away, local paths are made absolute with
symlinks resolved, and a URI must match a root's scheme (and bucket) exactly. A glob is checked by its
fixed prefix and, in the ranks, by every file it matches.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

from specs.errors import UsageError as UserError

BUILTIN_PREFIX = "builtin:"
READ_FIELDS = ("model.init_from", "distill.teacher", "rlhf.ppo.reward_model", "rlhf.data.demonstrations",
               "rlhf.data.demonstrations_heldout", "rlhf.data.comparisons", "rlhf.data.comparisons_heldout",
               "rlhf.data.prompts", "rlhf.data.eval_prompts")
"""Spec fields a job reads besides data.corpus."""
WRITE_FIELDS = ("rlhf.data.dir",)
"""Spec fields a job writes besides its run directory."""


class PathNotAllowedError(UserError):
    """A path outside the roots cluster.yaml allows."""


@dataclass(frozen=True)
class PathRoots:
    """Normalised roots: where jobs may read and where they may write (the storage root is in both)."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()

    def can_read(self, uri: str) -> bool:
        return any(_under(uri, r) for r in self.read + self.write)

    def can_write(self, uri: str) -> bool:
        return any(_under(uri, r) for r in self.write)


def normalize(uri: str) -> str:
    """``scheme://bucket/path`` with ``..`` folded, or an absolute local path with symlinks resolved."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        norm = posixpath.normpath("/" + rest)  # '/..' folds to '/', so a path cannot climb out of its bucket
        return f"{scheme.lower()}://{norm.lstrip('/')}"
    return os.path.realpath(os.path.expanduser(uri))


def _under(uri: str, root: str) -> bool:
    path, root = normalize(uri), root.rstrip("/") or "/"
    return path == root or path.startswith(root if root.endswith(("/", "://")) else root + "/")


def _glob_prefix(uri: str) -> str:
    """The fixed part of a glob: 'data/*.jsonl' -> 'data'."""
    cut = min((uri.find(c) for c in "*?[" if c in uri), default=-1)
    return uri if cut < 0 else uri[:cut].rsplit("/", 1)[0] or "/"


def make_roots(storage: str, read: list[str] | tuple[str, ...] = (), write: list[str] | tuple[str, ...] = ()
               ) -> PathRoots:
    """Roots from cluster.yaml values (already resolved against the file's folder): storage is always both."""
    w = (normalize(storage),) + tuple(normalize(r) for r in write)
    return PathRoots(read=tuple(normalize(r) for r in read), write=w)


def _get(spec, dotted: str):
    node = spec
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _describe(roots: PathRoots, write: bool) -> str:
    shown = roots.write if write else roots.read + roots.write
    return ", ".join(shown) or "(none)"


def check_job_paths(spec, roots: PathRoots | None, where: str = "spec") -> None:
    """Raise PathNotAllowedError (one line naming the field) unless every path of ``spec`` is allowed.

    ``roots`` None means no restriction (a Storage made without cluster.yaml, e.g. in unit tests); paths
    with control characters (a NUL fails every OS call) are refused either way.
    """
    for field in ("data.corpus",) + READ_FIELDS + WRITE_FIELDS:
        uri = _get(spec, field)
        if isinstance(uri, str) and any(ord(c) < 32 or ord(c) == 127 for c in uri):
            raise PathNotAllowedError(f"{where}: {field}: {uri!r} contains control characters; give a plain path")
    if roots is None:
        return
    corpus = spec.data.corpus
    if corpus and not corpus.startswith(BUILTIN_PREFIX) and not roots.can_read(_glob_prefix(corpus)):
        raise PathNotAllowedError(f"{where}: data.corpus: {corpus} is outside the read roots of cluster.yaml "
                                  f"(paths.read: {_describe(roots, False)}); move the data or add its folder")
    for field in READ_FIELDS:
        uri = _get(spec, field)
        if isinstance(uri, str) and uri and not roots.can_read(uri):
            raise PathNotAllowedError(f"{where}: {field}: {uri} is outside the read roots of cluster.yaml "
                                      f"(paths.read: {_describe(roots, False)}); move it or add its folder")
    for field in WRITE_FIELDS:
        uri = _get(spec, field)
        if isinstance(uri, str) and uri and not roots.can_write(uri):
            raise PathNotAllowedError(f"{where}: {field}: {uri} is outside the write roots of cluster.yaml "
                                      f"(storage and paths.write: {_describe(roots, True)})")


def check_files_readable(files: list[str], roots: PathRoots | None, field: str = "data.corpus") -> None:
    """In the ranks: every file a glob or folder resolved to (symlinks followed) is under a read root."""
    if roots is None:
        return
    for f in files:
        if not roots.can_read(f):
            raise PathNotAllowedError(f"{field}: {f} is outside the read roots of cluster.yaml "
                                      f"(paths.read: {_describe(roots, False)}); a link may point out of them")


def check_corpus_readable(corpus: str, storage) -> None:
    """In the rank that reads the corpus: its fixed prefix and every file it resolves to are under a read root."""
    roots = getattr(storage, "roots", None)
    if roots is None or not corpus or corpus.startswith(BUILTIN_PREFIX):
        return
    if not roots.can_read(_glob_prefix(corpus)):
        raise PathNotAllowedError(f"data.corpus: {corpus} is outside the read roots of cluster.yaml "
                                  f"(paths.read: {_describe(roots, False)})")
    from data.corpus import resolve_files

    fs, files = resolve_files(corpus, storage.options)
    check_files_readable([fs.unstrip_protocol(f) for f in files], roots)
