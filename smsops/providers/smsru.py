"""SMS.ru over httpx: sending, status lookup and its delivery-status callbacks.

Sending is ``POST {base}/sms/send`` with ``api_id``, ``to`` (digits, no ``+``), ``msg``, ``from``
(an approved sender) and ``json=1``. SMS.ru answers HTTP 200 even on errors: the top-level
``status``/``status_code`` says whether the request was understood, and each number's
``status_code`` whether that message was accepted (100, with ``sms_id``).

How a code becomes a :class:`~smsops.providers.SendResult` outcome:

=====================================================================  ==========================
SMS.ru code                                                            outcome
=====================================================================  ==========================
100 accepted                                                           ``accepted``
201 no funds, 206 daily limit, 220 service unavailable,                ``transient``
230 daily limit for the number, 231 same text within a minute (60 s),
232 same text within a day, 233 anti-fraud repeat limit
202 invalid number / no route, 203 no text, 204 sender not approved,   ``permanent``
205 too long, 207 no route, 208 bad time, 210–214 request errors
209 number in our stop list, 215 recipient complained (SMS.ru's list)  ``permanent``, ``opted_out``
200, 300, 301, 302 credentials refused                                 raises ``AuthenticationError``
500 server error, HTTP 5xx, unreadable answer, read timeout            ``unknown``
HTTP 429, connection refused / connect timeout                         ``transient``
any other code                                                         ``permanent``
=====================================================================  ==========================

Delivery statuses (callbacks and ``/sms/status``) map onto Twilio's vocabulary: 100 ``queued``,
101 ``sending``, 102 ``sent``, 103 ``delivered``, 110 ``read``, 104–108 ``undelivered`` and 150
``failed`` (both terminal; the SMS.ru code is kept as ``error_code``).

Callbacks: SMS.ru posts ``data[0]``, ``data[1]`` … each ``sms_status\\n<sms_id>\\n<code>`` (an
optional fourth line is a Unix time) and expects the body ``100``. It signs nothing and cannot
take a per-message callback URL, so the callback URL registered in the SMS.ru account carries a
secret: ``SMSRU_CALLBACK_TOKEN``, either as the ``token`` query parameter or as the URL's last
path segment (:meth:`SmsRuProvider.callback_url` builds it). It is compared in constant time; with
no token configured every callback is refused.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qs, quote, unquote, urlsplit

import httpx

from smsops.providers import (
    AuthenticationError,
    ConfigError,
    InboundMessage,
    InvalidSignature,
    MalformedCallback,
    ProviderUnavailable,
    SendRequest,
    SendResult,
    StatusUpdate,
    form_items,
    parse_amount,
    parse_int,
    scrub,
)
from smsops.providers.transport import parsed_url

__all__ = ["CODE_MEANINGS", "DEFAULT_BASE_URL", "DELIVERY_STATUS", "SmsRuProvider", "classify_code"]

DEFAULT_BASE_URL = "https://sms.ru"
ACCEPTED = 100

AUTH_CODES = frozenset({200, 300, 301, 302})
TRANSIENT_CODES = frozenset({201, 206, 220, 230, 231, 232, 233})
UNKNOWN_CODES = frozenset({500})
OPT_OUT_CODES = frozenset({209, 215})
RETRY_AFTER = {231: 60.0}

DELIVERY_STATUS: Mapping[int, str] = {
    100: "queued",
    101: "sending",
    102: "sent",
    103: "delivered",
    104: "undelivered",
    105: "undelivered",
    106: "undelivered",
    107: "undelivered",
    108: "undelivered",
    110: "read",
    150: "failed",
}
_FAILURES = frozenset({"undelivered", "failed"})

CODE_MEANINGS: Mapping[int, str] = {
    100: "accepted, in the queue",
    101: "being passed to the operator",
    102: "sent, in transit",
    103: "delivered",
    104: "not delivered: lifetime expired",
    105: "not delivered: deleted by the operator",
    106: "not delivered: phone failure",
    107: "not delivered: unknown reason",
    108: "not delivered: rejected",
    110: "read",
    150: "not delivered: no route to this number",
    200: "wrong api_id",
    201: "not enough funds",
    202: "invalid recipient number or no route",
    203: "no message text",
    204: "sender name not approved",
    205: "message too long",
    206: "daily sending limit reached",
    207: "no route to this number",
    208: "invalid time parameter",
    209: "number is in your stop list",
    210: "GET used where POST is required",
    211: "method not found",
    212: "message text must be UTF-8",
    213: "too many recipients",
    214: "number is abroad (sending only to Russian numbers is on)",
    215: "number is in SMS.ru's stop list (the recipient complained)",
    220: "service temporarily unavailable",
    230: "daily message limit for this number reached",
    231: "same message to this number within a minute",
    232: "same message to this number within a day",
    233: "too many repeated code messages to this number",
    300: "token expired or IP changed",
    301: "wrong api_id or login/password",
    302: "account not confirmed",
    500: "server error",
}
"""What SMS.ru's codes mean, for the people reading send and delivery failures."""

_DATA_KEY = re.compile(r"data(\[\d*\])?")
_SMS_ID = re.compile(r"[0-9A-Za-z\-]{1,64}")

log = logging.getLogger(__name__)


def classify_code(code: int | None, text: str | None = None, http_status: int | None = 200) -> SendResult:
    """Classify an SMS.ru error code (see the table in the module docstring); raises
    :class:`AuthenticationError` for refused credentials."""
    message = text or CODE_MEANINGS.get(code or 0) or f"SMS.ru code {code}"
    error_code = None if code is None else str(code)
    if code in AUTH_CODES:
        raise AuthenticationError(
            f"SMS.ru refused the credentials (code {code}: {CODE_MEANINGS[code]}): "
            "check SMSRU_API_ID in the environment or .streamlit/secrets.toml"
        )
    if code in TRANSIENT_CODES:
        return SendResult(
            "transient",
            error_code=error_code,
            error_message=message,
            retry_after=RETRY_AFTER.get(code),
            http_status=http_status,
        )
    if code is None or code in UNKNOWN_CODES:
        return SendResult("unknown", error_code=error_code, error_message=message, http_status=http_status)
    return SendResult(
        "permanent",
        error_code=error_code,
        error_message=message,
        http_status=http_status,
        opted_out=code in OPT_OUT_CODES,
    )


def _json(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class SmsRuProvider:
    """SMS.ru's HTTP API. ``test`` asks SMS.ru to simulate sends (``test=1``), nothing is billed."""

    api_id: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    callback_token: str | None = field(default=None, repr=False)
    test: bool = False
    name: str = "smsru"
    is_sandbox: bool = False

    def __post_init__(self) -> None:
        if not self.api_id:
            raise ConfigError("the SMS.ru api_id is empty: set SMSRU_API_ID in the environment")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"the SMS.ru base URL must start with http:// or https://, got {self.base_url!r}"
            )

    def _url(self, method: str) -> str:
        return f"{self.base_url.rstrip('/')}/{method}"

    def _describe(self, exc: Exception) -> str:
        return scrub(f"{type(exc).__name__}: {exc}".rstrip(": "), self.api_id, self.callback_token)

    async def send(self, client: httpx.AsyncClient, request: SendRequest) -> SendResult:
        """Submit one message. ``status_callback`` is ignored: SMS.ru posts receipts to the URL
        registered in the account (see :meth:`callback_url`)."""
        number = request.to.lstrip("+")
        data = {"api_id": self.api_id, "to": number, "msg": request.body, "json": "1"}
        if request.sender:
            data["from"] = request.sender
        if self.test:
            data["test"] = "1"
        try:
            response = await client.post(parsed_url(self._url("sms/send")), data=data)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return SendResult("transient", error_message=self._describe(exc))
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise ConfigError(f"cannot reach SMS.ru at {self.base_url!r}: {self._describe(exc)}") from None
        except httpx.HTTPError as exc:
            return SendResult("unknown", error_message=self._describe(exc))
        result = self._classify(response, number)
        if result.outcome != "accepted":
            log.info(
                "SMS.ru refused message %s: code %s (%s)",
                request.message_id,
                result.error_code,
                result.outcome,
            )
        return result

    def _classify(self, response: httpx.Response, number: str) -> SendResult:
        http_status = response.status_code
        if http_status != 200:
            if http_status == 429:
                return SendResult("transient", error_message="HTTP 429", http_status=http_status)
            outcome = "unknown" if http_status >= 500 or http_status < 400 else "permanent"
            return SendResult(
                outcome,
                error_code=f"http_{http_status}",
                error_message=f"HTTP {http_status}",
                http_status=http_status,
            )
        payload = _json(response)
        if not isinstance(payload, dict):
            return SendResult(
                "unknown", error_message="SMS.ru answered something that is not JSON", http_status=http_status
            )
        if payload.get("status") != "OK":
            return classify_code(
                parse_int(payload.get("status_code")), payload.get("status_text"), http_status
            )
        results = payload.get("sms") if isinstance(payload.get("sms"), dict) else {}
        entry = results.get(number)
        if entry is None and len(results) == 1:
            entry = next(iter(results.values()))
        if not isinstance(entry, dict):
            return SendResult(
                "unknown", error_message="SMS.ru gave no result for the number", http_status=http_status
            )
        code = parse_int(entry.get("status_code"))
        sms_id = entry.get("sms_id")
        if code == ACCEPTED and entry.get("status", "OK") == "OK" and isinstance(sms_id, str) and sms_id:
            return SendResult(
                "accepted",
                provider_message_id=sms_id,
                status="queued",
                segments=parse_int(entry.get("sms")),
                price=parse_amount(entry.get("cost")),
                price_unit="RUB" if entry.get("cost") is not None else None,
                http_status=http_status,
            )
        return classify_code(code, entry.get("status_text"), http_status)

    async def lookup(self, client: httpx.AsyncClient, provider_message_id: str) -> StatusUpdate | None:
        """The message's status from ``POST /sms/status``; ``None`` if SMS.ru does not know it."""
        if not _SMS_ID.fullmatch(provider_message_id or ""):
            return None
        data = {"api_id": self.api_id, "sms_id": provider_message_id, "json": "1"}
        try:
            response = await client.post(self._url("sms/status"), data=data)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"SMS.ru could not be asked: {self._describe(exc)}") from None
        payload = _json(response)
        if response.status_code != 200 or not isinstance(payload, dict):
            raise ProviderUnavailable(f"SMS.ru answered HTTP {response.status_code} to a status lookup")
        if payload.get("status") != "OK":
            code = parse_int(payload.get("status_code"))
            classify_code(code)  # raises for refused credentials
            raise ProviderUnavailable(f"SMS.ru refused a status lookup: code {code}")
        entry = (payload.get("sms") or {}).get(provider_message_id)
        status = (
            DELIVERY_STATUS.get(parse_int(entry.get("status_code")) or 0) if isinstance(entry, dict) else None
        )
        if status is None:
            return None
        code = str(entry["status_code"])
        return StatusUpdate(
            self.name, provider_message_id, status, code if status in _FAILURES else None, datetime.now(UTC)
        )

    async def find(
        self, client: httpx.AsyncClient, request: SendRequest, since: datetime
    ) -> list[StatusUpdate] | None:
        """SMS.ru has no search by recipient: an ``unknown`` send cannot be reconciled."""
        return None

    def callback_url(self, base: str) -> str:
        """``base`` (the public URL of the callback route) with the secret token, to register in the
        SMS.ru account. It holds a secret: show it once, never log it."""
        if not self.callback_token:
            raise ConfigError(
                "set SMSRU_CALLBACK_TOKEN to a long random string before registering a callback URL"
            )
        return f"{base}{'&' if '?' in base else '?'}token={quote(self.callback_token, safe='')}"

    def _authenticate(self, url: str) -> None:
        if not self.callback_token:
            log.warning("refused an SMS.ru callback: SMSRU_CALLBACK_TOKEN is not set")
            raise InvalidSignature(
                "SMS.ru callbacks are refused: set SMSRU_CALLBACK_TOKEN and register the callback URL with it"
            )
        parts = urlsplit(url)
        candidates = parse_qs(parts.query).get("token", [])
        candidates.append(unquote(parts.path.rstrip("/").rpartition("/")[2]))
        expected = self.callback_token.encode("utf-8")
        valid = False
        for candidate in candidates:
            valid |= hmac.compare_digest(candidate.encode("utf-8"), expected)
        if not valid:
            log.warning(
                "refused an SMS.ru callback to %s: missing or wrong token",
                parts.path.rpartition("/")[0] or "/",
            )
            raise InvalidSignature("the SMS.ru callback does not carry the configured token")

    def parse_callback(
        self, url: str, form: Mapping[str, str] | Sequence[tuple[str, str]], headers: Mapping[str, str]
    ) -> list[StatusUpdate]:
        """Every ``sms_status`` entry of a callback (other kinds are skipped); all or nothing."""
        self._authenticate(url)
        entries = [value for key, value in form_items(form) if _DATA_KEY.fullmatch(key)]
        if not entries:
            raise MalformedCallback("the SMS.ru callback has no data[n] entries")
        updates = []
        received = datetime.now(UTC)
        for index, entry in enumerate(entries):
            lines = [line.strip() for line in entry.replace("\r\n", "\n").split("\n")]
            if lines[0] != "sms_status":
                continue
            if len(lines) < 3 or not _SMS_ID.fullmatch(lines[1]) or parse_int(lines[2]) is None:
                raise MalformedCallback(
                    f"SMS.ru callback entry {index} is not 'sms_status\\n<sms_id>\\n<code>'"
                )
            code = int(lines[2])
            status = DELIVERY_STATUS.get(code)
            if status is None:
                raise MalformedCallback(f"SMS.ru callback entry {index} has an unknown status code {code}")
            when = received
            if len(lines) > 3 and lines[3].isdigit():
                when = datetime.fromtimestamp(int(lines[3]), UTC)
            updates.append(
                StatusUpdate(self.name, lines[1], status, str(code) if status in _FAILURES else None, when)
            )
        return updates

    def parse_inbound(
        self, url: str, form: Mapping[str, str] | Sequence[tuple[str, str]], headers: Mapping[str, str]
    ) -> InboundMessage:
        """Not supported: SMS.ru's plain sending accounts receive no replies through the API."""
        self._authenticate(url)
        raise MalformedCallback("SMS.ru inbound messages are not supported by this adapter")

    def callback_reply(self) -> tuple[int, str, str]:
        """SMS.ru counts a callback as handled only when the body is ``100``."""
        return 200, "text/plain", "100"
