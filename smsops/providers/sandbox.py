"""A local SMS provider that speaks Twilio's Messaging wire protocol, for demos and tests.

The Twilio adapter talks to it unchanged (``from_config("sandbox")`` points it here). It keeps
what it accepted in memory and has a real provider's bad days, each one a setting:

- ``POST /2010-04-01/Accounts/{sid}/Messages.json``: Basic auth (401 code 20003 otherwise),
  latency drawn from ``latency``, a limit of ``rate_per_second`` per account over any sliding
  one-second window (429 code 20429 with ``Retry-After``), transient 500/503 with probability
  ``transient_error_rate`` (and, as with Twilio, some of those messages were accepted anyway:
  ``ambiguous_error_rate``), then the destination's verdict:

  ======================================  ==================================================
  ``To`` (E.164, last two digits)         answer
  ======================================  ==================================================
  not ``+`` and 8–15 digits, or ``…00``   400, 21211 invalid ``To``
  ``…13``                                 400, 21610 unsubscribed (the recipient sent STOP)
  ``…14``                                 400, 21614 not a mobile number
  ``…97``                                 201, then ``sent`` → ``undelivered`` 30007 (filtered)
  ``…98``                                 201, then ``failed`` 30005 (unknown handset)
  ``…99``                                 201, then ``sent`` → ``undelivered`` 30003 (unreachable)
  anything else                           201, then ``sent`` → ``delivered``
  ======================================  ==================================================

  An accepted message gets a sid ``SM`` + 32 random hex digits (from :mod:`secrets`, so sids
  never repeat across restarts or sandboxes), ``num_segments`` from
  :func:`smsops.encoding.analyze` and a price from :mod:`smsops.pricing` (negative, as Twilio
  writes it, and given at once where Twilio may give it later).
- Receipts: each status is reached after a delay drawn from ``receipt_delay`` and posted to
  the message's ``StatusCallback``, signed with ``X-Twilio-Signature``; with probability
  ``out_of_order_rate`` they are posted in reverse order, with ``duplicate_rate`` the last one
  is posted twice. A message's receipts are posted one after another.
- Recipients (when ``click_rate`` or ``reply_rate`` is set): some time after a message is
  delivered, with probability ``click_rate`` its recipient follows the first tracked link in
  it (``…/l/<token>``, fetched from ``link_url`` with a phone's user agent), and with
  probability ``reply_rate`` replies «СТОП» (or STOP outside Russia) to ``inbound_url``; so the
  demo's Results page has clicks and opt-outs to show.
- Every post it makes (receipt, reply, click) is delivered like a provider's: an attempt that
  ends without an answer (connection refused or reset, ``callback_timeout`` passed) or is
  answered 408, 429 or 5xx is tried again after ``callback_retry`` (1 s, doubling up to 60 s
  by default, each wait shortened by up to half at random so that retries after an outage
  spread out, and never shorter than the receiver's ``Retry-After``), for ``callback_retry_for``
  seconds (15 minutes by default) after the first attempt; then it is given up with a WARNING.
  Any other answer settles it: 2xx (and 3xx for a click) delivered it; 3xx or 4xx refused it
  (the receiver found it malformed or forged, so it is not repeated). Waiting for one of the
  ``callback_connections`` connections is only a wait, never a failure. Each message's
  ``receipts`` (and ``engagement``) journal keeps every attempt (time, HTTP status or error)
  and the outcome; ``/sandbox/health`` counts the posts of each kind: posted, delivered,
  retried (attempts after the first), refused, given up and pending. Stopping the app cancels
  the posts still pending.
- ``GET …/Messages/{sid}.json`` and ``GET …/Messages.json?To=&From=&PageSize=&Page=``: lookups,
  with the same Basic auth.
- ``POST /sandbox/inbound`` (``From``, ``Body``, optional ``To``): posts a signed incoming
  message (a reply such as «СТОП») to ``inbound_url``; 200 with the webhook's answer once it
  is settled, 202 while it is being retried. Basic auth with the account sid and token: the
  post it makes is signed, so whoever may call it may opt a number in or out.
- ``GET /sandbox/messages``: every accepted message with its journals, as JSON; Basic auth.
- ``GET /sandbox/health``: open, and counts only (no numbers, no texts).

The behaviour's random choices come from one generator seeded with ``seed``: the same requests
sent one after another get the same answers; concurrent requests draw in arrival order. Sids
and the waits between retries are not drawn from it.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import random
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from smsops import encoding, phones, pricing
from smsops.providers import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN, advances
from smsops.providers.transport import LeanClient, parsed_url
from smsops.providers.twilio import API_VERSION, SIGNATURE_HEADER, request_signature

__all__ = [
    "SandboxServer",
    "SandboxSettings",
    "ServerThread",
    "create_app",
    "run_in_thread",
    "serve_in_thread",
]

log = logging.getLogger(__name__)

_E164 = re.compile(r"\+[1-9]\d{7,14}")
_PERMANENT = {
    "00": (21211, "The 'To' number {to} is not a valid phone number."),
    "13": (21610, "Attempt to send to unsubscribed recipient"),
    "14": (21614, "'To' number is not a valid mobile number"),
}
_FATE = {
    "97": (("sent", None), ("undelivered", "30007")),
    "98": (("failed", "30005"),),
    "99": (("sent", None), ("undelivered", "30003")),
}
_DELIVERED = (("sent", None), ("delivered", None))
_TRACKED_LINK = re.compile(r"https?://\S+?/l/([0-9A-Za-z_-]{6,64})(?![0-9A-Za-z_-])")
_PHONE_BROWSER = (
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Mobile Safari/537.36"
)


@dataclass(frozen=True, slots=True)
class SandboxSettings:
    """How the sandbox behaves. Probabilities are between 0 and 1; times are in seconds."""

    seed: int = 0
    latency: tuple[float, float] = (0.02, 0.08)
    rate_per_second: float = 1000.0
    transient_error_rate: float = 0.01
    ambiguous_error_rate: float = 0.5
    duplicate_rate: float = 0.05
    out_of_order_rate: float = 0.05
    receipt_delay: tuple[float, float] = (0.2, 1.5)
    account_sid: str = SANDBOX_ACCOUNT_SID
    auth_token: str = field(default=SANDBOX_AUTH_TOKEN, repr=False)
    inbound_url: str | None = None
    inbound_number: str = "+15005550006"
    click_rate: float = 0.0
    """Share of delivered messages whose recipient follows the message's tracked link."""
    reply_rate: float = 0.0
    """Share of delivered messages whose recipient replies STOP (needs ``inbound_url``)."""
    engagement_delay: tuple[float, float] = (2.0, 60.0)
    """Seconds after delivery before a simulated recipient clicks or replies."""
    link_url: str | None = None
    """Where the tracked links' ``/l/<token>`` route is served (the webhook app), whatever
    public address the links carry; None: no clicks."""
    callback_timeout: float = 15.0
    """Seconds one post (receipt, reply, click) may take to connect, send and be answered."""
    callback_retry: tuple[float, float] = (1.0, 60.0)
    """The wait before a post's first retry, doubling up to the second number."""
    callback_retry_for: float = 900.0
    """Seconds after its first attempt that a post is retried before it is given up."""
    callback_connections: int = 1000
    """Connections open at once to the receivers; more posts wait for one (never fail)."""

    def __post_init__(self) -> None:
        for name in (
            "transient_error_rate", "ambiguous_error_rate", "duplicate_rate", "out_of_order_rate",
            "click_rate", "reply_rate",
        ):  # fmt: skip
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SandboxSettings.{name} must be between 0 and 1, got {value}")
        for name in ("latency", "receipt_delay", "engagement_delay"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high:
                raise ValueError(
                    f"SandboxSettings.{name} must be (low, high) with 0 <= low <= high, got {(low, high)}"
                )
        if self.rate_per_second < 1:
            raise ValueError(
                f"SandboxSettings.rate_per_second must be at least 1, got {self.rate_per_second}"
            )
        low, high = self.callback_retry
        if not 0.0 < low <= high:
            raise ValueError(
                f"SandboxSettings.callback_retry must be (first, cap) with 0 < first <= cap, got {(low, high)}"
            )
        if self.callback_timeout <= 0 or self.callback_retry_for < 0 or self.callback_connections < 1:
            raise ValueError(
                "SandboxSettings needs callback_timeout > 0, callback_retry_for >= 0 and "
                f"callback_connections >= 1, got {self.callback_timeout}, {self.callback_retry_for}, "
                f"{self.callback_connections}"
            )
        if not self.account_sid or not self.auth_token:
            raise ValueError("SandboxSettings needs an account sid and an auth token")


# ---------------------------------------------------------------------------------------
# State


@dataclass(slots=True)
class _Message:
    sid: str
    account_sid: str
    to: str
    from_: str
    body: str
    segments: int
    price: str
    price_unit: str
    status_callback: str | None
    created: datetime
    created_at: float  # loop-independent monotonic time
    events: list[tuple[float, str, str | None]]  # (monotonic time, status, error code)
    receipts: list[dict[str, Any]] = field(default_factory=list)  # the posts of its receipts
    engagement: list[dict[str, Any]] = field(default_factory=list)  # its recipient's click, reply

    def state(self, now: float | None) -> tuple[str, str | None, datetime]:
        """The status reached by ``now`` (statuses only move forward), its error code and time;
        ``now=None``: as created."""
        status, error, at = "queued", None, self.created_at
        for when, new, code in sorted(self.events):
            if now is not None and when <= now and advances(status, new):
                status, error, at = new, code, when
        return status, error, self.created + timedelta(seconds=at - self.created_at)

    def resource(self, now: float | None) -> dict[str, Any]:
        status, error, updated = self.state(now)
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{self.sid}"
        return {
            "sid": self.sid,
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "to": self.to,
            "from": self.from_,
            "body": self.body,
            "status": status,
            "direction": "outbound-api",
            "num_segments": str(self.segments),
            "num_media": "0",
            "price": self.price,
            "price_unit": self.price_unit,
            "error_code": int(error) if error else None,
            "error_message": None,
            "messaging_service_sid": None,
            "date_created": _rfc2822(self.created),
            "date_updated": _rfc2822(updated),
            "date_sent": _rfc2822(updated) if status != "queued" else None,
            "uri": f"{uri}.json",
            "subresource_uris": {"media": f"{uri}/Media.json", "feedback": f"{uri}/Feedback.json"},
        }


def _rfc2822(when: datetime) -> str:
    return format_datetime(when.astimezone(UTC).replace(microsecond=0))


def _failure(
    http_status: int, code: int, message: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str] | None, dict[str, Any]]:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": http_status,
    }
    return http_status, headers, body


def _error(http_status: int, code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    status, extra, body = _failure(http_status, code, message, headers)
    return JSONResponse(body, status_code=status, headers=extra)


_CHALLENGE = {"WWW-Authenticate": 'Basic realm="Twilio API"'}


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _new_sid() -> str:
    """``SM`` + 32 hex digits that no other run or sandbox gives."""
    return f"SM{secrets.token_hex(16)}"


# ---------------------------------------------------------------------------------------
# Posting to the receivers, as a provider does


@dataclass(slots=True)
class _Tally:
    """How the posts of one kind (receipts, replies, clicks) fared."""

    posted: int = 0
    delivered: int = 0
    retried: int = 0  # attempts after a post's first
    refused: int = 0
    given_up: int = 0

    def report(self) -> dict[str, int]:
        settled = self.delivered + self.refused + self.given_up
        return {
            "posted": self.posted,
            "delivered": self.delivered,
            "retried": self.retried,
            "refused": self.refused,
            "given_up": self.given_up,
            "pending": self.posted - settled,
        }


@dataclass(slots=True)
class _Post:
    """One receipt, reply or click on its way, with its journal entry."""

    kind: str
    what: str  # for the log: "receipt 'sent' of SM…"
    url: str
    params: dict[str, str] | None  # a form to POST; None: a GET
    headers: dict[str, str]
    entry: dict[str, Any]
    started: float = field(default_factory=time.monotonic)

    def request(self) -> httpx.Request:
        """The HTTP request, made by hand: what httpx's ``build_request`` would make (the same
        headers and form encoding), without its merging of client defaults, cookies and URLs,
        which was most of the sandbox's CPU for a receipt."""
        url = parsed_url(self.url)
        if self.params is None:
            return httpx.Request("GET", url, headers=self.headers)
        body = urlencode(self.params).encode("ascii")
        raw = [
            (b"Host", url.netloc),
            (b"Accept", b"*/*"),
            (b"Accept-Encoding", b"gzip, deflate"),
            (b"Connection", b"keep-alive"),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()),
            (b"Content-Length", b"%d" % len(body)),
            (b"Content-Type", b"application/x-www-form-urlencoded"),
        ]
        return httpx.Request("POST", url, headers=raw, stream=httpx.ByteStream(body))


class _Courier:
    """Delivers the sandbox's posts like a provider: each attempt journaled, the failed ones
    retried with backoff until the receiver takes or refuses them, or they are too old."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.client: httpx.AsyncClient | None = None
        self.tally = {kind: _Tally() for kind in ("receipts", "replies", "clicks")}
        self.jitter = random.Random()  # not the seeded generator: retries follow the receiver's timing

    def open_client(self) -> httpx.AsyncClient:
        connections = self.settings.callback_connections
        # no pool timeout: waiting for a connection is a wait, not a failed post. The lean client:
        # httpx's own pool scans every connection and queued post on each request (seen: most of
        # `smsops serve`'s CPU at 150 msg/s, and at 1,000 msg/s a backlog it never worked off)
        self.client = LeanClient(
            timeout=httpx.Timeout(self.settings.callback_timeout, pool=None), max_connections=connections
        )
        return self.client

    def post(
        self,
        kind: str,
        what: str,
        url: str,
        journal: list[dict[str, Any]],
        label: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Post:
        """A post to ``url`` (a signed POST of ``params``, or a GET), entered in ``journal`` as
        ``label``; :meth:`deliver` sends it."""
        headers = {"User-Agent": "TwilioProxy/1.1 (smsops sandbox)", **(headers or {})}
        if params is not None:
            headers[SIGNATURE_HEADER] = request_signature(self.settings.auth_token, url, params)
        entry: dict[str, Any] = {
            "status": label, "at": _now(), "outcome": "pending", "delivered": False, "attempts": [],
        }  # fmt: skip
        journal.append(entry)
        self.tally[kind].posted += 1
        return _Post(kind, what, url, params, headers, entry)

    async def deliver(self, post: _Post) -> None:
        """Tries ``post`` until it is settled or given up."""
        asked = await self.attempt(post)
        if asked is not None:
            await self.retry(post, asked)

    async def retry(self, post: _Post, asked: float) -> None:
        """Tries ``post`` again after backoff (at least the ``asked`` seconds) until it is settled
        or ``callback_retry_for`` has passed since its first attempt."""
        delay, cap = self.settings.callback_retry
        while True:
            wait = min(cap, max(asked, delay * self.jitter.uniform(0.5, 1.0)))
            if time.monotonic() + wait - post.started > self.settings.callback_retry_for:
                self.give_up(post)
                return
            await asyncio.sleep(wait)
            delay = min(cap, delay * 2)
            next_asked = await self.attempt(post)
            if next_asked is None:
                return
            asked = next_asked

    async def attempt(self, post: _Post) -> float | None:
        """Tries ``post`` once: None if that settled it, else the seconds the receiver asked to
        wait before the next try (0 when it did not say)."""
        entry = post.entry
        attempt: dict[str, Any] = {"at": _now()}
        entry["attempts"].append(attempt)
        if len(entry["attempts"]) > 1:
            self.tally[post.kind].retried += 1
        assert self.client is not None, "the sandbox posts only while its app is running"
        try:
            response = await self.client.send(post.request())
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:  # no retry can help
            self.note(entry, attempt, error=type(exc).__name__)
            self.give_up(post)
            return None
        except httpx.HTTPError as exc:  # refused, reset, timed out: the receiver may be back soon
            self.note(entry, attempt, error=type(exc).__name__)
            return 0.0
        status = response.status_code
        self.note(entry, attempt, http_status=status)
        if 200 <= status < 300 or (post.params is None and 300 <= status < 400):  # a link redirects
            self.settle(post, "delivered")
            return None
        if status in (408, 429) or status >= 500:
            retry_after = response.headers.get("retry-after", "")
            return float(retry_after) if retry_after.isdigit() else 0.0
        self.settle(post, "refused")  # malformed or forged, says the receiver: repeating won't help
        return None

    @staticmethod
    def note(entry: dict[str, Any], attempt: dict[str, Any], **result: Any) -> None:
        """Records an attempt's ``http_status`` or ``error``, in it and as the entry's latest."""
        attempt.update(result)
        entry.pop("http_status", None)
        entry.pop("error", None)
        entry.update(result)

    def settle(self, post: _Post, outcome: str) -> None:
        post.entry["outcome"] = outcome
        post.entry["delivered"] = outcome == "delivered"
        tally = self.tally[post.kind]
        setattr(tally, outcome, getattr(tally, outcome) + 1)

    def give_up(self, post: _Post) -> None:
        self.settle(post, "given_up")
        last = post.entry["attempts"][-1]
        log.warning(
            "sandbox gave up the %s to %s after %d attempts in %.0f s (the last: %s)",
            post.what,
            post.url,
            len(post.entry["attempts"]),
            time.monotonic() - post.started,
            last.get("error") or f"HTTP {last.get('http_status')}",
        )


class _Sandbox:
    """The simulator's memory and behaviour; one per app."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.messages: dict[str, _Message] = {}
        self.windows: dict[str, deque[float]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.courier = _Courier(settings)
        self.inbound: list[dict[str, Any]] = []

    # -- helpers -----------------------------------------------------------------------

    def authorized(self, authorization: str, account: str | None) -> bool:
        """Basic auth with this sandbox's account sid and token, for ``account``'s resources."""
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        same_user = hmac.compare_digest(user.encode(), self.settings.account_sid.encode())
        same_password = hmac.compare_digest(password.encode(), self.settings.auth_token.encode())
        return same_user and same_password and account == user

    def request_authorized(self, request: Request) -> bool:
        """For the API's routes: the account in the path is the one authenticated."""
        return self.authorized(request.headers.get("authorization", ""), request.path_params.get("account"))

    def own_route_authorized(self, request: Request) -> bool:
        """For the ``/sandbox/…`` routes: this sandbox's account."""
        return self.authorized(request.headers.get("authorization", ""), self.settings.account_sid)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs ``work`` in the background until it ends or the app stops."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def throttle(self, account: str, now: float) -> float:
        """0 if the request fits in the last second's allowance, else the seconds to wait."""
        window = self.windows.setdefault(account, deque())
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) < int(self.settings.rate_per_second):
            window.append(now)
            return 0.0
        return window[0] + 1.0 - now

    def uniform(self, bounds: tuple[float, float]) -> float:
        low, high = bounds
        return low if high <= low else self.rng.uniform(low, high)

    def accept(self, account: str, to: str, from_: str, body: str, callback: str | None) -> _Message:
        now = time.monotonic()
        segments = encoding.analyze(body).segments
        country = phones.normalize(to).country
        cost = pricing.message_cost(segments, country)
        fate = _FATE.get(to[-2:], _DELIVERED)
        times = sorted(self.uniform(self.settings.receipt_delay) for _ in fate)
        events = [(now + delay, status, code) for delay, (status, code) in zip(times, fate, strict=True)]
        message = _Message(
            sid=_new_sid(),
            account_sid=account,
            to=to,
            from_=from_,
            body=body,
            segments=segments,
            price=f"{-cost:.5f}",
            price_unit=pricing.price(country).currency,
            status_callback=callback,
            created=datetime.now(UTC),
            created_at=now,
            events=events,
        )
        self.messages[message.sid] = message
        if callback:
            posts = [(when, status, code) for when, status, code in events]
            if len(posts) > 1 and self.rng.random() < self.settings.out_of_order_rate:
                statuses = [(status, code) for _, status, code in reversed(posts)]
                posts = [(when, *status) for (when, _, _), status in zip(posts, statuses, strict=True)]
            if self.rng.random() < self.settings.duplicate_rate:
                when, status, code = posts[-1]
                posts.append((when + 0.01, status, code))
            self.spawn(self.post_receipts(message, posts))
        return message

    async def post_receipts(self, message: _Message, posts: list[tuple[float, str, str | None]]) -> None:
        assert message.status_callback is not None
        for when, status, code in posts:  # one after another: the next once this one is settled
            await asyncio.sleep(max(0.0, when - time.monotonic()))
            params = {
                "MessageSid": message.sid,
                "SmsSid": message.sid,
                "AccountSid": message.account_sid,
                "From": message.from_,
                "To": message.to,
                "MessageStatus": status,
                "SmsStatus": status,
                "ApiVersion": API_VERSION,
            }
            if code:
                params["ErrorCode"] = code
            what = f"receipt {status!r} of {message.sid}"
            receipt = self.courier.post(
                "receipts", what, message.status_callback, message.receipts, status, params
            )
            await self.courier.deliver(receipt)
        if any(status == "delivered" for _, status, _ in posts):
            await self.engage(message)

    async def engage(self, message: _Message) -> None:
        """The recipient of a delivered message, maybe: follows its link, replies STOP."""
        settings = self.settings
        clicks = settings.link_url is not None and self.rng.random() < settings.click_rate
        stops = settings.inbound_url is not None and self.rng.random() < settings.reply_rate
        if not (clicks or stops):
            return
        await asyncio.sleep(self.uniform(settings.engagement_delay))
        link = _TRACKED_LINK.search(message.body) if clicks else None
        if link is not None:
            url = f"{(settings.link_url or '').rstrip('/')}/l/{link.group(1)}"
            click = self.courier.post(
                "clicks", f"click on {link.group(0)}", url, message.engagement, "clicked",
                headers={"User-Agent": _PHONE_BROWSER},
            )  # fmt: skip
            await self.courier.deliver(click)
        if stops:
            body = "СТОП" if message.to.startswith("+7") else "STOP"
            params = self.inbound_params(message.to, message.from_, body)
            what = f"reply {params['MessageSid']}"
            reply = self.courier.post(
                "replies", what, settings.inbound_url or "", message.engagement, "received", params
            )
            self.inbound.append({**params, "webhook": reply.entry})
            await self.courier.deliver(reply)

    # -- routes ------------------------------------------------------------------------

    async def submit(
        self, account: str, authorization: str, body: bytes
    ) -> tuple[int, dict[str, str] | None, dict[str, Any]]:
        """``POST …/Messages.json``: (HTTP status, extra headers, JSON payload)."""
        delay = self.uniform(self.settings.latency)
        if delay > 0:
            await asyncio.sleep(delay)
        if not self.authorized(authorization, account):
            return _failure(401, 20003, "Authenticate", _CHALLENGE)
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        to, from_, text = form.get("To", "").strip(), form.get("From", "").strip(), form.get("Body", "")
        if not to:
            return _failure(400, 21604, "A 'To' phone number is required.")
        if not from_:
            return _failure(400, 21603, "A 'From' phone number is required.")
        if not text:
            return _failure(400, 21602, "Message body is required.")
        wait = self.throttle(account, time.monotonic())
        if wait > 0:
            return _failure(429, 20429, "Too Many Requests", {"Retry-After": str(max(1, math.ceil(wait)))})
        callback = form.get("StatusCallback") or None
        if self.rng.random() < self.settings.transient_error_rate:
            if (
                self.rng.random() < self.settings.ambiguous_error_rate
                and _E164.fullmatch(to)
                and to[-2:] not in _PERMANENT
            ):
                self.accept(account, to, from_, text, callback)
            if self.rng.random() < 0.5:
                return _failure(500, 20500, "Internal Server Error")
            return _failure(503, 20503, "Service Unavailable", {"Retry-After": "1"})
        if not _E164.fullmatch(to):
            code, message = _PERMANENT["00"]
            return _failure(400, code, message.format(to=to))
        if to[-2:] in _PERMANENT:
            code, message = _PERMANENT[to[-2:]]
            return _failure(400, code, message.format(to=to))
        accepted = self.accept(account, to, from_, text, callback)
        return 201, None, accepted.resource(None)

    async def fetch_message(self, request: Request) -> Response:
        if not self.request_authorized(request):
            return _error(401, 20003, "Authenticate", _CHALLENGE)
        message = self.messages.get(request.path_params["sid"])
        if message is None or message.account_sid != request.path_params["account"]:
            return _error(404, 20404, f"The requested resource {request.url.path} was not found")
        return JSONResponse(message.resource(time.monotonic()))

    async def list_messages(self, request: Request) -> Response:
        if not self.request_authorized(request):
            return _error(401, 20003, "Authenticate", _CHALLENGE)
        account = request.path_params["account"]
        query = request.query_params
        try:
            size = min(1000, max(1, int(query.get("PageSize", "50"))))
            page = max(0, int(query.get("Page", "0")))
        except ValueError:
            return _error(400, 20001, "PageSize and Page must be integers")
        matches = [
            m
            for m in reversed(self.messages.values())
            if m.account_sid == account
            and query.get("To", m.to) == m.to
            and query.get("From", m.from_) == m.from_
        ]
        now = time.monotonic()
        chunk = matches[page * size : (page + 1) * size]
        path = f"/{API_VERSION}/Accounts/{account}/Messages.json"
        filters = {key: query[key] for key in ("To", "From") if key in query}

        def page_uri(number: int) -> str:
            return f"{path}?{urlencode({**filters, 'PageSize': size, 'Page': number})}"

        more = (page + 1) * size < len(matches)
        return JSONResponse(
            {
                "messages": [m.resource(now) for m in chunk],
                "page": page,
                "page_size": size,
                "start": page * size,
                "end": page * size + max(0, len(chunk) - 1),
                "uri": page_uri(page),
                "first_page_uri": page_uri(0),
                "next_page_uri": page_uri(page + 1) if more else None,
                "previous_page_uri": page_uri(page - 1) if page > 0 else None,
            }
        )

    def inbound_params(self, from_: str, to: str, body: str) -> dict[str, str]:
        """The form Twilio posts for an incoming SMS."""
        sid = _new_sid()
        return {
            "MessageSid": sid,
            "SmsMessageSid": sid,
            "SmsSid": sid,
            "AccountSid": self.settings.account_sid,
            "From": from_,
            "To": to,
            "Body": body,
            "NumMedia": "0",
            "NumSegments": str(encoding.analyze(body).segments) if body else "1",
            "SmsStatus": "received",
            "ApiVersion": API_VERSION,
        }

    async def send_inbound(self, request: Request) -> Response:
        if not self.own_route_authorized(request):
            return _error(401, 20003, "Authenticate", _CHALLENGE)
        if not self.settings.inbound_url:
            return JSONResponse(
                {"message": "no inbound webhook is configured (SandboxSettings.inbound_url)"}, 409
            )
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
        if not form.get("From") or "Body" not in form:
            return JSONResponse({"message": "From and Body are required"}, 400)
        params = self.inbound_params(
            form["From"], form.get("To") or self.settings.inbound_number, form["Body"]
        )
        sid = params["MessageSid"]
        journal: list[dict[str, Any]] = []
        reply = self.courier.post(
            "replies", f"reply {sid}", self.settings.inbound_url, journal, "received", params
        )
        self.inbound.append({**params, "webhook": reply.entry})
        asked = await self.courier.attempt(reply)
        answer = {"sid": sid, "webhook_status": reply.entry.get("http_status")}
        if asked is None and reply.entry["outcome"] == "given_up":
            return JSONResponse(
                {**answer, "message": f"the inbound webhook cannot be posted to: {reply.entry}"}, 502
            )
        if asked is None:
            return JSONResponse(answer)
        self.spawn(self.courier.retry(reply, asked))
        return JSONResponse(
            {
                **answer,
                "error": reply.entry.get("error"),
                "message": "the inbound webhook did not take it; the sandbox retries it for "
                f"{self.settings.callback_retry_for:g} s",
            },
            202,
        )

    async def list_accepted(self, request: Request) -> Response:
        if not self.own_route_authorized(request):
            return _error(401, 20003, "Authenticate", _CHALLENGE)
        now = time.monotonic()
        return JSONResponse(
            [
                {**m.resource(now), "receipts": list(m.receipts), "engagement": list(m.engagement)}
                for m in self.messages.values()
            ]
        )

    async def health(self, request: Request) -> Response:
        """Open to all, so counts only: no numbers, no texts."""
        posts = {kind: tally.report() for kind, tally in self.courier.tally.items()}
        return JSONResponse({"ok": True, "sandbox": True, "messages": len(self.messages), **posts})


_CREATE_PATH = re.compile(rf"/{API_VERSION}/Accounts/([^/]+)/Messages\.json")


class _SandboxApp(Starlette):
    """Starlette, with ``POST …/Messages.json`` (every send: thousands a second in a benchmark)
    answered as plain ASGI before routing; the sandbox's CPU is taken from the dispatcher's
    when both run on the same machine."""

    def __init__(self, sandbox: _Sandbox, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sandbox = sandbox

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _CREATE_PATH.fullmatch(scope["path"])
            if match:
                await self._create(scope, receive, send, match.group(1))
                return
        await super().__call__(scope, receive, send)

    async def _create(self, scope: Scope, receive: Receive, send: Send, account: str) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        authorization = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
        status, extra, payload = await self._sandbox.submit(
            account, authorization.decode("latin-1"), b"".join(chunks)
        )
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(settings: SandboxSettings | None = None) -> Starlette:
    """The sandbox as a Starlette app (mount it, or serve it with :func:`run_in_thread`)."""
    sandbox = _Sandbox(settings or SandboxSettings())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with sandbox.courier.open_client():
            try:
                yield
            finally:  # the posts still pending go with the app
                for task in list(sandbox.tasks):
                    task.cancel()
                await asyncio.gather(*sandbox.tasks, return_exceptions=True)
                sandbox.courier.client = None

    account = f"/{API_VERSION}/Accounts/{{account}}"
    app = _SandboxApp(
        sandbox,
        routes=[
            Route(f"{account}/Messages.json", sandbox.list_messages, methods=["GET"]),
            Route(f"{account}/Messages/{{sid}}.json", sandbox.fetch_message, methods=["GET"]),
            Route("/sandbox/inbound", sandbox.send_inbound, methods=["POST"]),
            Route("/sandbox/messages", sandbox.list_accepted, methods=["GET"]),
            Route("/sandbox/health", sandbox.health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.sandbox_settings = sandbox.settings
    return app


# ---------------------------------------------------------------------------------------
# Serving on loopback in a background thread


class ServerThread:
    """An ASGI app served by uvicorn in a background thread; stops on ``close()`` or on leaving
    its ``with`` block. ``port=0`` picks a free port; :attr:`url` says which."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"uvicorn-{host}:{port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> Self:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(
                    f"the server on {self.host}:{self.port} did not start (is the port taken?)"
                )
            time.sleep(0.005)
        sockets: Sequence[Any] = self._server.servers[0].sockets
        self.port = sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SandboxServer(ServerThread):
    """The sandbox, running. ``settings`` says how it behaves."""

    def __init__(self, settings: SandboxSettings, host: str = "127.0.0.1", port: int = 0) -> None:
        self.settings = settings
        super().__init__(create_app(settings), host, port)


def serve_in_thread(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> ServerThread:
    """Serve ``app`` on ``host`` in a background thread, started; use it in a ``with`` block."""
    return ServerThread(app, host, port).start()


def run_in_thread(
    settings: SandboxSettings | None = None, host: str = "127.0.0.1", port: int = 0
) -> SandboxServer:
    """Start the sandbox on ``host`` in a background thread; use it in a ``with`` block."""
    return SandboxServer(settings or SandboxSettings(), host, port).start()
