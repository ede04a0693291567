"""CLI commands about who acts: ``switchyard whoami`` and ``switchyard token create | list | revoke``.

Like the job commands (``orchestrator/cli_jobs.py``) they work on the head,
against the job store, or from a laptop over the HTTP API when cluster.yaml
names ``api.url``. Creating a token and touching someone else's tokens needs
an admin there; on the head, whoever can read the job store can.
"""
from __future__ import annotations

import sys
import time

from orchestrator import json_output
from orchestrator.cli_jobs import _age, _clip, _cluster, _remote, _store, local_user, span
from specs.errors import UsageError


def cmd_whoami(args) -> int:
    """`switchyard whoami`: who this machine acts as (the API token's user, or the login name on the head)."""
    cluster = _cluster(args)
    client = _remote(args)
    if client is not None:
        me, where = client.whoami(), f"over the API at {cluster.api.url}"
    else:
        user = local_user()
        me, where = {"user": user, "admin": user in cluster.admins}, "on the head (the login name)"
    if args.json:
        print(json_output.dumps(me))
        return 0
    admin = ("an admin: may cancel or change anyone's job" if me["admin"] else
             "may cancel or change your own jobs")
    print(f"{me['user']} {where}; {admin}")
    return 0


# `switchyard token create|list|revoke`: on the head, or over the API (create and others' tokens: admins).


def _token_create(args) -> int:
    client = _remote(args)
    if client is not None:
        token = client.create_token(args.user, args.admin, args.expires)["token"]
    else:
        token = _store(_cluster(args)).create_token(args.user, args.admin, args.expires)
    print(token)
    lasts = f", valid for {span(args.expires)}" if args.expires else ""
    print(f"token for {args.user.lower()}{' (admin)' if args.admin else ''}{lasts}: only its hash is stored, so "
          "keep it now; on the laptop put it in $SWITCHYARD_TOKEN or ~/.switchyard/token", file=sys.stderr)
    return 0


def _token_list(args) -> int:
    client = _remote(args)
    rows = (client.tokens(args.user) if client is not None
            else [t.to_dict() for t in _store(_cluster(args)).tokens(args.user)])
    if args.json:
        print(json_output.dumps(rows))
        return 0
    if not rows:
        print(f"{args.user.lower()} has no API tokens" if args.user else
              "no API tokens yet: `switchyard token create USER` makes one")
        return 0
    print(f"{'ID':<13} {'USER':<20} {'ADMIN':<5} {'AGE':>6}  EXPIRES")
    now = time.time()
    for t in rows:
        admin, end = "yes" if t["admin"] else "-", t.get("expires_at")
        expires = "never" if end is None else "expired" if end <= now else f"in {span(end - now)}"
        print(f"{t['id']:<13} {_clip(t['user'], 20):<20} {admin:<5} {_age(t['created_at']):>6}  {expires}")
    return 0


def _token_revoke(args) -> int:
    if (args.user is None) == (args.id is None):
        raise UsageError("token revoke: give a USER (all of their tokens) or --id ID (one token), not both")
    client = _remote(args)
    store = _store(_cluster(args)) if client is None else None
    if args.id is not None:
        info = client.revoke_token(args.id) if client is not None else store.revoke_token(args.id).to_dict()
        print(f"revoked token {info['id']} of {info['user']}{' (admin)' if info['admin'] else ''}")
        return 0
    n = client.revoke_tokens(args.user)["revoked"] if client is not None else store.revoke_tokens(args.user)
    print(f"revoked {n} token(s) of {args.user.lower()}" if n else f"{args.user.lower()} had no API tokens")
    return 0


def register(sub) -> None:
    from orchestrator.job_records import TOKEN_MAX_LIFETIME_S
    from specs.validate import duration_arg

    p = sub.add_parser("whoami", help="who this machine acts as: the API token's user, or the login name on the "
                                      "head; and whether an admin")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_whoami)
    p = sub.add_parser("token", help="API tokens: `token create USER [--admin]` prints a new bearer token; "
                                     "`token list`, `token revoke USER | --id ID`")
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="{create,list,revoke}")
    q = tsub.add_parser("create", help="print a new bearer token for USER (only its hash is kept)")
    q.add_argument("user")
    q.add_argument("--admin", action="store_true", help="may cancel or change anyone's job")
    q.add_argument("--expires", type=duration_arg(TOKEN_MAX_LIFETIME_S), default=None, metavar="DURATION",
                   help="refused after this long: 90m, 12h, 30d (default: valid until revoked)")
    q.set_defaults(func=_token_create)
    q = tsub.add_parser("list", help="the API tokens by id (never the tokens): every one on the head or for an "
                                     "admin, your own otherwise")
    q.add_argument("user", nargs="?", default=None, help="only this user's tokens")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_token_list)
    q = tsub.add_parser("revoke", help="revoke every token of USER, or one by --id (its requests get 401 at once)")
    q.add_argument("user", nargs="?", default=None)
    q.add_argument("--id", default=None, help="a token id from `token list` (a unique prefix of 4+ digits works)")
    q.set_defaults(func=_token_revoke)
