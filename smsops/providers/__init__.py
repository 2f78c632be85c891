"""SMS providers: one interface, an adapter per provider, credentials only from the environment.

A :class:`Provider` sends one message (:meth:`Provider.send` → :class:`SendResult`), looks a
message up for reconciliation, and turns the provider's status callbacks into
:class:`StatusUpdate` rows after checking that the provider really sent them.

Adapters: ``twilio`` (Programmable Messaging, :mod:`smsops.providers.twilio`), ``sandbox``
(the same Twilio adapter pointed at the local simulator in :mod:`smsops.providers.sandbox`) and
``smsru`` (:mod:`smsops.providers.smsru`). :func:`from_config` builds one from environment
variables or from the values of ``.streamlit/secrets.toml``.

What a :class:`SendResult` outcome tells the dispatcher:

- ``accepted``: the provider took the message; receipts will follow.
- ``transient``: nothing was sent; retry later (after ``retry_after`` seconds when given).
- ``permanent``: never retry; ``opted_out`` says the recipient unsubscribed (record it).
- ``unknown``: the request may have been acted on (timeout after sending, 5xx). Neither
  Twilio nor SMS.ru has an idempotency key, so reconcile (:meth:`Provider.find`,
  :meth:`Provider.lookup`) before any resend; never resend blindly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import httpx

__all__ = [
    "PROVIDERS",
    "SANDBOX_ACCOUNT_SID",
    "SANDBOX_AUTH_TOKEN",
    "SANDBOX_URL",
    "STATUS_RANK",
    "TERMINAL_STATUSES",
    "AuthenticationError",
    "CallbackError",
    "ConfigError",
    "InboundMessage",
    "InvalidSignature",
    "MalformedCallback",
    "Outcome",
    "Provider",
    "ProviderError",
    "ProviderUnavailable",
    "SendRequest",
    "SendResult",
    "StatusUpdate",
    "advances",
    "form_items",
    "from_config",
    "header",
    "parse_amount",
    "parse_int",
    "retry_after_seconds",
    "scrub",
]

Outcome = Literal["accepted", "transient", "permanent", "unknown"]

PROVIDERS = ("sandbox", "twilio", "smsru")

# The sandbox's demo credentials: public on purpose, they guard nothing but a local simulator.
SANDBOX_URL = "http://127.0.0.1:8765"
SANDBOX_ACCOUNT_SID = "AC" + "5a2db0c0" * 4
SANDBOX_AUTH_TOKEN = "sandbox-demo-auth-token"

# Delivery statuses in the order a message moves through them (Twilio's vocabulary; other
# adapters map theirs onto it). Equal ranks never replace each other.
STATUS_RANK: Mapping[str, int] = {
    "scheduled": 0,
    "accepted": 1,
    "queued": 2,
    "sending": 3,
    "sent": 4,
    "delivered": 5,
    "undelivered": 5,
    "failed": 5,
    "canceled": 5,
    "read": 6,
}
TERMINAL_STATUSES = frozenset({"delivered", "undelivered", "failed", "canceled", "read"})


def advances(current: str | None, new: str) -> bool:
    """Whether a message whose status is ``current`` should move to ``new``: statuses only ever
    move forward, so a late ``sent`` never overwrites ``delivered``. Unknown statuses never do."""
    if new not in STATUS_RANK:
        return False
    return current is None or STATUS_RANK[new] > STATUS_RANK.get(current, -1)


# ---------------------------------------------------------------------------------------
# Errors


class ProviderError(Exception):
    """Base class for errors raised by :mod:`smsops.providers`. Messages never hold secrets."""


class ConfigError(ProviderError, ValueError):
    """A provider is unknown or its credentials are missing from the environment."""


class AuthenticationError(ProviderError):
    """The provider refused our credentials: no message can go out until they are fixed, so the
    dispatcher should pause rather than fail each message."""


class ProviderUnavailable(ProviderError):
    """The provider could not be asked (network error, 5xx) during a lookup: try again later."""


class CallbackError(ProviderError):
    """A callback that must not be stored."""


class InvalidSignature(CallbackError):
    """The callback's signature (or secret token) is missing or wrong: answer 403."""


class MalformedCallback(CallbackError, ValueError):
    """The callback is authentic but its body is not what the provider sends: answer 400."""


# ---------------------------------------------------------------------------------------
# Boundary types


@dataclass(frozen=True, slots=True)
class SendRequest:
    """One message to send. ``message_id`` is ours (the outbox row), for logs and receipts."""

    message_id: int
    to: str  # E.164
    sender: str
    body: str
    status_callback: str | None = None


@dataclass(frozen=True, slots=True)
class SendResult:
    """What the provider answered to one send, classified for the dispatcher.

    ``price`` is the amount charged, positive, in ``price_unit`` (Twilio reports it negative);
    ``None`` when the provider did not say yet.
    """

    outcome: Outcome
    provider_message_id: str | None = None
    status: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    retry_after: float | None = None
    segments: int | None = None
    price: float | None = None
    http_status: int | None = None
    opted_out: bool = False
    price_unit: str | None = None


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A message's status as the provider reported it (callback or lookup).

    ``status`` uses the :data:`STATUS_RANK` vocabulary; ``error_code`` is the provider's own
    code for a failure (Twilio 30003…, SMS.ru 104…). ``occurred_at`` is the provider's time when
    it gives one, else when we received the update.
    """

    provider: str
    provider_message_id: str
    status: str
    error_code: str | None
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message a recipient sent us (a reply such as «СТОП»)."""

    provider: str
    provider_message_id: str
    from_: str
    to: str
    body: str
    received_at: datetime


@runtime_checkable
class Provider(Protocol):
    """What every adapter offers. Adapters are immutable and hold no connection: the caller
    passes its ``httpx.AsyncClient`` (with its timeouts and pool limits)."""

    @property
    def name(self) -> str: ...

    @property
    def is_sandbox(self) -> bool:
        """True when messages go to the local simulator, not to real phones."""
        ...

    async def send(self, client: httpx.AsyncClient, request: SendRequest) -> SendResult:
        """Submit one message. Never raises for a per-message problem; raises
        :class:`AuthenticationError` when the credentials are refused."""
        ...

    async def lookup(self, client: httpx.AsyncClient, provider_message_id: str) -> StatusUpdate | None:
        """The provider's current status of a message it accepted; ``None`` if it has none."""
        ...

    async def find(
        self, client: httpx.AsyncClient, request: SendRequest, since: datetime
    ) -> list[StatusUpdate] | None:
        """Messages the provider holds that match ``request`` (same To, From, body) created at or
        after ``since``: how an ``unknown`` send is reconciled. ``None``: this provider cannot
        search, so the fate of an unknown send stays unknown."""
        ...

    def parse_callback(
        self, url: str, form: Mapping[str, str] | Sequence[tuple[str, str]], headers: Mapping[str, str]
    ) -> list[StatusUpdate]:
        """Authenticate a status callback (``url`` as the provider requested it) and parse it.
        Raises :class:`InvalidSignature` (→ 403) or :class:`MalformedCallback` (→ 400)."""
        ...

    def parse_inbound(
        self, url: str, form: Mapping[str, str] | Sequence[tuple[str, str]], headers: Mapping[str, str]
    ) -> InboundMessage:
        """Authenticate and parse an inbound-message webhook; same errors as ``parse_callback``."""
        ...

    def callback_reply(self) -> tuple[int, str, str]:
        """What to answer an accepted callback: HTTP status, content type, body."""
        ...


# ---------------------------------------------------------------------------------------
# Small helpers the adapters share


def form_items(form: Mapping[str, str] | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every (name, value) pair of a form, repeated names included (Starlette's ``FormData``,
    a plain dict or a list of pairs)."""
    multi_items = getattr(form, "multi_items", None)
    if callable(multi_items):
        return [(str(k), str(v)) for k, v in multi_items()]
    if isinstance(form, Mapping):
        return [(str(k), str(v)) for k, v in form.items()]
    return [(str(k), str(v)) for k, v in form]


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, whatever the case of its name in ``headers``."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)


def parse_int(value: object) -> int | None:
    """A whole number from a provider's JSON or form value (``"2"``, ``2``), else None."""
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def parse_amount(value: object) -> float | None:
    """A charged amount as a positive number (Twilio writes prices negative, ``"-0.0395"``)."""
    try:
        return abs(float(str(value))) if value is not None else None
    except ValueError:
        return None


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header as seconds from now (delay-seconds or an HTTP date)."""
    if not value:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` with every secret replaced by ``***``, for messages that quote the outside."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------------------------------
# Configuration


def _setting(env: Mapping[str, object], key: str) -> str | None:
    value = env.get(key)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _required(env: Mapping[str, object], provider: str, *keys: str) -> list[str]:
    values = [_setting(env, key) for key in keys]
    missing = [key for key, value in zip(keys, values, strict=True) if value is None]
    if missing:
        raise ConfigError(
            f"the {provider} provider needs {', '.join(keys)} set in the environment or in "
            f".streamlit/secrets.toml; missing: {', '.join(missing)}"
        )
    return [value for value in values if value is not None]


def from_config(name: str, env: Mapping[str, object] = os.environ) -> Provider:
    """The provider called ``name`` (``sandbox``, ``twilio`` or ``smsru``), with credentials read
    from ``env`` (the environment by default, or the values of ``.streamlit/secrets.toml``).

    Variables: ``TWILIO_ACCOUNT_SID``, ``TWILIO_AUTH_TOKEN``, ``TWILIO_BASE_URL``;
    ``SANDBOX_URL``, ``SANDBOX_ACCOUNT_SID``, ``SANDBOX_AUTH_TOKEN`` (demo defaults);
    ``SMSRU_API_ID``, ``SMSRU_BASE_URL``, ``SMSRU_CALLBACK_TOKEN``, ``SMSRU_TEST``.
    """
    from smsops.providers.smsru import DEFAULT_BASE_URL as SMSRU_BASE_URL
    from smsops.providers.smsru import SmsRuProvider
    from smsops.providers.twilio import DEFAULT_BASE_URL as TWILIO_BASE_URL
    from smsops.providers.twilio import TwilioProvider

    key = (name or "").strip().lower()
    if key == "sandbox":
        return TwilioProvider(
            account_sid=_setting(env, "SANDBOX_ACCOUNT_SID") or SANDBOX_ACCOUNT_SID,
            auth_token=_setting(env, "SANDBOX_AUTH_TOKEN") or SANDBOX_AUTH_TOKEN,
            base_url=_setting(env, "SANDBOX_URL") or SANDBOX_URL,
            name="sandbox",
            is_sandbox=True,
        )
    if key == "twilio":
        sid, token = _required(env, "twilio", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN")
        return TwilioProvider(
            account_sid=sid, auth_token=token, base_url=_setting(env, "TWILIO_BASE_URL") or TWILIO_BASE_URL
        )
    if key == "smsru":
        (api_id,) = _required(env, "smsru", "SMSRU_API_ID")
        return SmsRuProvider(
            api_id=api_id,
            base_url=_setting(env, "SMSRU_BASE_URL") or SMSRU_BASE_URL,
            callback_token=_setting(env, "SMSRU_CALLBACK_TOKEN"),
            test=(_setting(env, "SMSRU_TEST") or "0").lower() in {"1", "true", "yes"},
        )
    raise ConfigError(f"unknown SMS provider {name!r}: choose one of {', '.join(PROVIDERS)}")
