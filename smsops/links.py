"""Tracked links: each recipient's ``link()`` becomes a short URL of its own.

A template's ``link(url)`` renders a placeholder as long as the final short link
(:mod:`smsops.templates`), so the planned message already has its final length, encoding and
price. When the dispatcher claims a message, :func:`track` swaps each placeholder for
``<link base><token>``: a random token stored in the ``links`` table with the message and the
address it stands for, in the same transaction as the claim, before the provider is called.
A message claimed again after a crash keeps the tokens it got the first time (its stored
text no longer holds a placeholder).

Tokens are 8 characters of ``[0-9A-Za-z]`` from :mod:`secrets`: about 2**47.6 values, so a
million live links leave a guesser one chance in 200 million per try. The click route
(the webhook app's click route) redirects only to the address stored for the token:
there is no open redirect.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from smsops import config, templates

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TOKEN = re.compile(rf"[0-9A-Za-z]{{{config.LINK_TOKEN_LENGTH}}}")
"""What the tokens this module mints look like."""

_SPACE = len(ALPHABET) ** config.LINK_TOKEN_LENGTH


class LinkError(RuntimeError):
    """A message whose link placeholders cannot be matched to its template's addresses."""


@dataclass(frozen=True, slots=True)
class Pending:
    """A claimed message that may hold link placeholders."""

    message_id: int
    campaign_id: int
    variant: str
    body: str | None


def new_token() -> str:
    """A fresh random token (uniform over the whole token space)."""
    n = secrets.randbelow(_SPACE)
    out = []
    for _ in range(config.LINK_TOKEN_LENGTH):
        n, r = divmod(n, 62)
        out.append(ALPHABET[r])
    return "".join(out)


def placeholders_of(template_source: str) -> dict[str, str]:
    """For a variant's template: the code each of its placeholders ends in (``xxxxxxxx``,
    ``xxxxxxx1``, …) and the address it stands for."""
    template = templates.compile(template_source)
    return {placeholder[-_LENGTH:]: url for url, placeholder in template.link_placeholders.items()}


class Tracker:
    """Swaps link placeholders for tokens in claimed messages; remembers each variant's links."""

    def __init__(self) -> None:
        self._variants: dict[tuple[int, str], dict[str, str]] = {}

    def track(self, conn: sqlite3.Connection, rows: Sequence[Pending], now: datetime) -> dict[int, str]:
        """Give every placeholder in ``rows`` a token (inserted into ``links``) and store the new
        text of each changed message. Returns ``{message_id: new body}`` for the changed ones.

        Call it inside the transaction that claims the rows, so that the text a provider gets is
        the text the outbox holds. The short link keeps the base the message was planned with,
        so its length, and the price, stay as planned."""
        candidates = [r for r in rows if r.body and _MARK in r.body]
        if not candidates:
            return {}
        self._load(conn, {(r.campaign_id, r.variant) for r in candidates})
        stamp = now.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        changed: dict[int, str] = {}
        minted: list[tuple[str, int, str, str]] = []
        for row in candidates:
            codes = self._variants.get((row.campaign_id, row.variant))
            if not codes:
                continue

            def swap(
                match: re.Match[str], codes: dict[str, str] = codes, message_id: int = row.message_id
            ) -> str:
                url = codes.get(match.group(2))
                if url is None:
                    return match.group(0)
                token = new_token()
                minted.append((token, message_id, url, stamp))
                return match.group(1) + token

            body = _PLACEHOLDER.sub(swap, row.body or "")
            if body != row.body:
                changed[row.message_id] = body
        _insert(conn, minted, changed)
        conn.executemany(
            "update messages set body = ? where message_id = ?", [(b, m) for m, b in changed.items()]
        )
        return changed

    def _load(self, conn: sqlite3.Connection, keys: Iterable[tuple[int, str]]) -> None:
        for campaign_id, variant in keys:
            if (campaign_id, variant) in self._variants:
                continue
            found = conn.execute(
                "select template from campaign_variants where campaign_id = ? and variant = ?",
                (campaign_id, variant),
            ).fetchone()
            self._variants[(campaign_id, variant)] = placeholders_of(found[0]) if found else {}


_LENGTH = config.LINK_TOKEN_LENGTH
_MARK = "x" * (_LENGTH - 1)
# A placeholder: an address's base, then seven "x" and a mark for which link it is.
_PLACEHOLDER = re.compile(rf"(https?://\S*?/)(x{{{_LENGTH - 1}}}[{templates.LINK_MARKS}])(?![0-9A-Za-z])")


def _insert(
    conn: sqlite3.Connection, minted: list[tuple[str, int, str, str]], changed: dict[int, str]
) -> None:
    """Insert the new links. A token already taken (vanishingly rare) is drawn again, and the
    message's text follows."""
    for _ in range(5):
        tokens = [m[0] for m in minted]
        taken = {
            t
            for (t,) in conn.execute(
                "select token from links where token in (select value from json_each(?))",
                (json.dumps(tokens),),
            )
        }
        if not taken and len(set(tokens)) == len(tokens):
            conn.executemany(
                "insert into links (token, message_id, url, created_at) values (?, ?, ?, ?)", minted
            )
            return
        seen: set[str] = set()
        for i, (token, message_id, url, stamp) in enumerate(minted):
            if token in taken or token in seen:
                fresh = new_token()
                changed[message_id] = changed[message_id].replace("/" + token, "/" + fresh, 1)
                minted[i] = (fresh, message_id, url, stamp)
                token = fresh
            seen.add(token)
    raise LinkError("could not draw unused link tokens after five tries")


# ---------------------------------------------------------------------------------------
# Clicks that are not people


@functools.cache
def _preview_agents() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The dbt project's ``link_preview_agents`` and ``link_preview_agent_exceptions`` vars: the
    one list both the marts and the fresh A/B verdicts go by."""
    import yaml  # dbt's own dependency

    with (config.dbt_project_dir() / "dbt_project.yml").open(encoding="utf-8") as fh:
        variables = (yaml.safe_load(fh) or {}).get("vars", {})
    return (
        tuple(str(f).lower() for f in variables.get("link_preview_agents", ())),
        tuple(str(f).lower() for f in variables.get("link_preview_agent_exceptions", ())),
    )


def is_link_preview(method: str | None, user_agent: str | None) -> bool:
    """Whether a click is a link preview's or a scanner's probe, not a person's: a ``HEAD``, or
    a user agent naming a known preview agent (the rule of ``stg_ops__clicks``)."""
    if (method or "GET").upper() == "HEAD":
        return True
    if not user_agent:
        return False
    agent = user_agent.lower()
    fragments, exceptions = _preview_agents()
    return any(f in agent for f in fragments) and not any(e in agent for e in exceptions)
