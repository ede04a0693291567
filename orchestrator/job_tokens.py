"""The job store's API tokens: bearer tokens for the HTTP API and the dashboard, kept only as SHA-256 hashes.

A mixin of ``JobStore`` (``orchestrator/job_store.py``), like ``job_queries``:
every method runs in one of the store's transactions. A token's id is the
first ``TOKEN_ID_CHARS`` hex digits of its hash, so ``token list`` and
``token revoke --id`` never show or take the token itself.
"""
from __future__ import annotations

import hashlib
import secrets

from orchestrator.job_records import TOKEN_ID_CHARS, TOKEN_MAX_LIFETIME_S, TokenInfo, TokenNotFoundError, validate_name
from specs.errors import UsageError


class JobTokens:
    """Create, check, list and revoke API tokens."""

    def create_token(self, user: str, admin: bool = False, expires_in_s: float | None = None) -> str:
        """A new bearer token for ``user``, valid for ``expires_in_s`` seconds (None: until revoked); only
        its SHA-256 is stored, so print it now or lose it."""
        user = validate_name(user, "user name")
        if expires_in_s is not None and (isinstance(expires_in_s, bool) or not isinstance(expires_in_s, (int, float))
                                         or not 0 < expires_in_s <= TOKEN_MAX_LIFETIME_S):
            raise UsageError(f"expires: give a lifetime from 1 second to {TOKEN_MAX_LIFETIME_S // 86400} days, "
                             f"got {expires_in_s!r}")
        token = "sy_" + secrets.token_urlsafe(32)
        now = self._clock()
        with self._write() as conn:
            conn.execute("INSERT INTO tokens (hash, user, admin, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                         (_token_hash(token), user, int(bool(admin)), now,
                          None if expires_in_s is None else now + expires_in_s))
        return token

    def check_token(self, token: str) -> tuple[str, bool] | None:
        """(user, admin) for a valid token, else None (unknown, revoked or expired)."""
        if not isinstance(token, str) or not token:
            return None
        with self._read() as conn:
            row = conn.execute("SELECT user, admin, expires_at FROM tokens WHERE hash = ?",
                               (_token_hash(token),)).fetchone()
        if row is None or (row["expires_at"] is not None and self._clock() >= row["expires_at"]):
            return None
        return row["user"], bool(row["admin"])

    def tokens(self, user: str | None = None) -> list[TokenInfo]:
        """Every API token (or ``user``'s), oldest first, by id: the hashes' first digits, never the tokens."""
        where, args = ("WHERE user = ?", (user.lower(),)) if user is not None else ("", ())
        with self._read() as conn:
            rows = conn.execute(f"SELECT hash, user, admin, created_at, expires_at FROM tokens {where} "
                                "ORDER BY created_at, rowid", args).fetchall()
        return [_token_info(r) for r in rows]

    def token_by_id(self, token_id: str) -> TokenInfo:
        """The one token whose id starts with ``token_id`` (at least 4 hex digits)."""
        return _token_info(self._token_row(token_id))

    def revoke_token(self, token_id: str) -> TokenInfo:
        """Delete the one token whose id starts with ``token_id``; the next request with it gets 401."""
        row = self._token_row(token_id)
        with self._write() as conn:
            conn.execute("DELETE FROM tokens WHERE hash = ?", (row["hash"],))
        return _token_info(row)

    def _token_row(self, token_id: str):
        tid = token_id.strip().lower() if isinstance(token_id, str) else ""
        if len(tid) < 4 or any(c not in "0123456789abcdef" for c in tid):
            raise UsageError(f"token id: give at least 4 hex digits of an id `switchyard token list` shows, "
                             f"got {token_id!r}")
        with self._read() as conn:
            rows = conn.execute("SELECT hash, user, admin, created_at, expires_at FROM tokens WHERE hash LIKE ? "
                                "LIMIT 2", (tid + "%",)).fetchall()
        if not rows:
            raise TokenNotFoundError(f"no API token has the id {tid} (`switchyard token list` shows them)")
        if len(rows) > 1:
            raise UsageError(f"token id {tid} matches more than one token; give more of it")
        return rows[0]

    def revoke_tokens(self, user: str) -> int:
        """Delete every token of ``user``; returns how many."""
        with self._write() as conn:
            return conn.execute("DELETE FROM tokens WHERE user = ?", (user.lower(),)).rowcount


def _token_info(row) -> TokenInfo:
    return TokenInfo(row["hash"][:TOKEN_ID_CHARS], row["user"], bool(row["admin"]), row["created_at"],
                     row["expires_at"])


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()

