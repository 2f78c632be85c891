"""Twilio Programmable Messaging over httpx, and Twilio's request signatures.

Sending is ``POST {base}/2010-04-01/Accounts/{sid}/Messages.json``, form-encoded ``To``,
``From``, ``Body`` and ``StatusCallback``, with HTTP Basic auth (account sid, auth token). Twilio
answers 201 with the message resource (``sid``, ``status``, and ``num_segments`` and ``price`` as
strings, ``price`` negative or null) or an error ``{code, message, more_info, status}``.

How an answer becomes a :class:`~smsops.providers.SendResult` outcome:

==========================================================  ===========================
answer                                                      outcome
==========================================================  ===========================
2xx with a ``sid``                                          ``accepted``
2xx without a readable ``sid``                              ``unknown``
429, or code 20429 / 14107 (rate limits, never processed)   ``transient`` (Retry-After)
connection refused / connect or pool timeout (nothing sent) ``transient``
400 code 21610 (recipient replied STOP)                     ``permanent``, ``opted_out``
any other 4xx (21211 invalid To, 21614 not a mobile, …)     ``permanent``
401 (credentials refused)                                   raises ``AuthenticationError``
5xx (no idempotency key: may have been sent)                ``unknown``
read/write timeout, dropped connection after sending        ``unknown``
==========================================================  ===========================

``X-Twilio-Signature`` = base64(HMAC-SHA1(auth token, URL + each POST parameter's name and value,
sorted by name)); :func:`request_signature` computes it, :func:`verify_signature` checks it in
constant time and, like Twilio's own libraries, accepts the URL with or without its port.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from smsops.providers import (
    STATUS_RANK,
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
    header,
    parse_amount,
    parse_int,
    retry_after_seconds,
    scrub,
)
from smsops.providers.transport import parsed_url

__all__ = [
    "API_VERSION",
    "DEFAULT_BASE_URL",
    "ERROR_MEANINGS",
    "SIGNATURE_HEADER",
    "TwilioProvider",
    "classify_response",
    "request_signature",
    "verify_signature",
]

DEFAULT_BASE_URL = "https://api.twilio.com"
API_VERSION = "2010-04-01"
SIGNATURE_HEADER = "X-Twilio-Signature"

TRANSIENT_CODES = frozenset({"20429", "14107"})
OPT_OUT_CODES = frozenset({"21610"})

ERROR_MEANINGS: Mapping[str, str] = {
    "14107": "sending rate limit exceeded",
    "20003": "authentication failed",
    "20404": "resource not found",
    "20429": "too many requests",
    "21211": "invalid 'To' phone number",
    "21408": "sending to this region is not enabled",
    "21602": "message body is required",
    "21603": "'From' is required",
    "21604": "'To' is required",
    "21610": "recipient unsubscribed (replied STOP)",
    "21612": "no route to this number",
    "21614": "'To' is not a mobile number",
    "30003": "unreachable destination handset",
    "30004": "message blocked",
    "30005": "unknown destination handset",
    "30006": "landline or unreachable carrier",
    "30007": "filtered by the carrier",
    "30008": "unknown error",
}
"""What Twilio's error codes mean, for the people reading delivery failures."""

TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
_SID = re.compile(r"[A-Za-z0-9]{2,64}")
_FIND_PAGES = 5
_FIND_PAGE_SIZE = 50

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Signatures


def _sorted_pairs(params: Mapping[str, str] | Sequence[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    grouped: dict[str, set[str]] = {}
    for name, value in form_items(params):
        grouped.setdefault(name, set()).add(value)
    for name in sorted(grouped):
        for value in sorted(grouped[name]):
            yield name, value


def request_signature(
    auth_token: str, url: str, params: Mapping[str, str] | Sequence[tuple[str, str]] = ()
) -> str:
    """The ``X-Twilio-Signature`` Twilio sends with a POST of ``params`` to ``url``.

    A parameter sent several times counts once per distinct value, values sorted, as Twilio's
    libraries do.
    """
    data = url + "".join(name + value for name, value in _sorted_pairs(params))
    digest = hmac.new(auth_token.encode("utf-8"), data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _url_variants(url: str) -> list[str]:
    """``url`` as given, without its port, and with the scheme's default port added."""
    variants = [url]
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return variants
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if port is not None:
        other = hostport[: hostport.rfind(":")]
    elif parts.scheme in ("http", "https"):
        other = f"{hostport}:{443 if parts.scheme == 'https' else 80}"
    else:
        return variants
    variants.append(urlunsplit(parts._replace(netloc=userinfo + at + other)))
    return variants


def verify_signature(
    auth_token: str,
    url: str,
    params: Mapping[str, str] | Sequence[tuple[str, str]],
    signature: str | None,
) -> bool:
    """Whether ``signature`` is Twilio's for a POST of ``params`` to ``url`` (compared in constant
    time; the URL may carry its port or not, as Twilio signs either form)."""
    if not signature or not auth_token:
        return False
    given = signature.strip().encode("utf-8")
    pairs = list(_sorted_pairs(params))
    valid = False
    for candidate in _url_variants(url):
        valid |= hmac.compare_digest(request_signature(auth_token, candidate, pairs).encode("ascii"), given)
    return valid


# ---------------------------------------------------------------------------------------
# Answers


def _code(value: object) -> str | None:
    return None if value is None or value == "" else str(value)


def _rfc2822(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def classify_response(http_status: int, payload: object, retry_after: str | None = None) -> SendResult:
    """Classify Twilio's answer to a send (see the table in the module docstring).

    Raises :class:`AuthenticationError` on 401: no message can go out with these credentials.
    """
    body = payload if isinstance(payload, dict) else {}
    if 200 <= http_status < 300:
        sid = body.get("sid")
        if not isinstance(sid, str) or not _SID.fullmatch(sid):
            return SendResult(
                "unknown",
                http_status=http_status,
                error_message="the provider answered success without a readable message sid",
            )
        return SendResult(
            "accepted",
            provider_message_id=sid,
            status=str(body.get("status") or "queued"),
            segments=parse_int(body.get("num_segments")),
            price=parse_amount(body.get("price")),
            price_unit=_code(body.get("price_unit")),
            http_status=http_status,
        )
    code = _code(body.get("code"))
    message = str(body.get("message") or f"HTTP {http_status}")
    if http_status == 401:
        raise _refused(code)
    if http_status == 429 or code in TRANSIENT_CODES:
        return SendResult(
            "transient",
            error_code=code or "20429",
            error_message=message,
            retry_after=retry_after_seconds(retry_after),
            http_status=http_status,
        )
    if http_status >= 500 or http_status < 400:
        return SendResult(
            "unknown",
            error_code=code,
            error_message=message,
            retry_after=retry_after_seconds(retry_after),
            http_status=http_status,
        )
    return SendResult(
        "permanent",
        error_code=code,
        error_message=message,
        http_status=http_status,
        opted_out=code in OPT_OUT_CODES,
    )


def _refused(code: str | None) -> AuthenticationError:
    return AuthenticationError(
        f"the provider refused the credentials (HTTP 401, code {code or 'none'}): "
        "check the account sid and auth token in the environment or .streamlit/secrets.toml"
    )


def _json(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


def _path(url: str) -> str:
    """The path of a URL, for log lines (never its query, which may hold a token)."""
    try:
        return urlsplit(url).path or "/"
    except ValueError:
        return "?"


# ---------------------------------------------------------------------------------------
# The adapter


@dataclass(frozen=True, slots=True)
class TwilioProvider:
    """Twilio's Messaging API, or the sandbox that speaks it (``is_sandbox``)."""

    account_sid: str
    auth_token: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    name: str = "twilio"
    is_sandbox: bool = False

    def __post_init__(self) -> None:
        if not _SID.fullmatch(self.account_sid or ""):
            raise ConfigError(
                f"the {self.name} account sid must be letters and digits (AC…), got {self.account_sid!r}"
            )
        if not self.auth_token:
            raise ConfigError(f"the {self.name} auth token is empty: set it in the environment")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"the {self.name} base URL must start with http:// or https://, got {self.base_url!r}"
            )

    @property
    def account_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/{API_VERSION}/Accounts/{self.account_sid}"

    @property
    def messages_url(self) -> str:
        return f"{self.account_url}/Messages.json"

    def _headers(self) -> dict[str, str]:
        credentials = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode("ascii")
        return {"Authorization": f"Basic {credentials}", "Accept": "application/json"}

    def _describe(self, exc: Exception) -> str:
        return scrub(f"{type(exc).__name__}: {exc}".rstrip(": "), self.auth_token)

    async def send(self, client: httpx.AsyncClient, request: SendRequest) -> SendResult:
        """Submit one message; see the module docstring for how answers are classified."""
        data = {"To": request.to, "From": request.sender, "Body": request.body}
        if request.status_callback:
            data["StatusCallback"] = request.status_callback
        try:
            response = await client.post(parsed_url(self.messages_url), data=data, headers=self._headers())
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return SendResult("transient", error_message=self._describe(exc))
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise ConfigError(
                f"cannot reach {self.name} at {self.base_url!r}: {self._describe(exc)}"
            ) from None
        except httpx.HTTPError as exc:
            return SendResult("unknown", error_message=self._describe(exc))
        result = classify_response(response.status_code, _json(response), response.headers.get("Retry-After"))
        if result.outcome != "accepted":
            log.info(
                "%s refused message %s: HTTP %s code %s (%s)",
                self.name,
                request.message_id,
                result.http_status,
                result.error_code,
                result.outcome,
            )
        return result

    async def _get(
        self, client: httpx.AsyncClient, url: str, params: Mapping[str, str] | None
    ) -> httpx.Response:
        try:
            response = await client.get(url, params=params, headers=self._headers())
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"{self.name} could not be asked: {self._describe(exc)}") from None
        if response.status_code == 401:
            payload = _json(response)
            raise _refused(_code(payload.get("code")) if isinstance(payload, dict) else None)
        if response.status_code >= 500 or response.status_code == 429:
            raise ProviderUnavailable(f"{self.name} answered HTTP {response.status_code}: try again later")
        return response

    def _update(self, message: Mapping[str, object]) -> StatusUpdate | None:
        sid, status = message.get("sid"), message.get("status")
        if not isinstance(sid, str) or not isinstance(status, str):
            return None
        when = (
            _rfc2822(message.get("date_updated"))
            or _rfc2822(message.get("date_created"))
            or datetime.now(UTC)
        )
        return StatusUpdate(self.name, sid, status, _code(message.get("error_code")), when)

    async def lookup(self, client: httpx.AsyncClient, provider_message_id: str) -> StatusUpdate | None:
        """The message's current status (``GET Messages/{sid}.json``); ``None`` if Twilio has none.

        Raises :class:`~smsops.providers.ProviderUnavailable` when Twilio cannot be asked now.
        """
        if not _SID.fullmatch(provider_message_id or ""):
            return None
        url = f"{self.account_url}/Messages/{quote(provider_message_id, safe='')}.json"
        response = await self._get(client, url, None)
        if response.status_code == 404:
            return None
        payload = _json(response)
        if response.status_code != 200 or not isinstance(payload, dict):
            raise ProviderUnavailable(f"{self.name} answered HTTP {response.status_code} to a message lookup")
        return self._update(payload)

    async def find(
        self, client: httpx.AsyncClient, request: SendRequest, since: datetime
    ) -> list[StatusUpdate] | None:
        """Messages to ``request.to`` from ``request.sender`` with the same body, created at or
        after ``since`` (newest first, a few pages at most): reconciles an ``unknown`` send."""
        since = since.replace(microsecond=0) if since.tzinfo else since.replace(microsecond=0, tzinfo=UTC)
        url: str | None = self.messages_url
        params: Mapping[str, str] | None = {
            "To": request.to,
            "From": request.sender,
            "PageSize": str(_FIND_PAGE_SIZE),
        }
        found: list[StatusUpdate] = []
        for _ in range(_FIND_PAGES):
            if url is None:
                break
            response = await self._get(client, url, params)
            payload = _json(response)
            if response.status_code != 200 or not isinstance(payload, dict):
                raise ProviderUnavailable(
                    f"{self.name} answered HTTP {response.status_code} to a message search"
                )
            older = False
            for message in payload.get("messages") or []:
                created = _rfc2822(message.get("date_created"))
                if created is not None and created < since:
                    older = True
                    continue
                if message.get("body") == request.body and (update := self._update(message)):
                    found.append(update)
            next_page = payload.get("next_page_uri")
            url = f"{self.base_url.rstrip('/')}{next_page}" if next_page and not older else None
            params = None
        return found

    def _verify(self, kind: str, url: str, pairs: list[tuple[str, str]], headers: Mapping[str, str]) -> None:
        if not verify_signature(self.auth_token, url, pairs, header(headers, SIGNATURE_HEADER)):
            log.warning(
                "rejected a %s %s to %s: missing or invalid %s", self.name, kind, _path(url), SIGNATURE_HEADER
            )
            raise InvalidSignature(
                f"the {self.name} {kind} to {_path(url)} has a missing or invalid {SIGNATURE_HEADER}: "
                "it was not sent by the provider, or the URL differs from the one the provider called"
            )

    def parse_callback(
        self, url: str, form: Mapping[str, str] | Sequence[tuple[str, str]], headers: Mapping[str, str]
    ) -> list[StatusUpdate]:
        """A signed status callback (``MessageSid``, ``MessageStatus``, ``ErrorCode``) as one update."""
        pairs = form_items(form)
        self._verify("status callback", url, pairs, headers)
        fields = dict(pairs)
        sid = fields.get("MessageSid") or fields.get("SmsSid")
        status = (fields.get("MessageStatus") or fields.get("SmsStatus") or "").strip().lower()
        if not sid or not status:
            raise MalformedCallback(f"the {self.name} status callback lacks MessageSid or MessageStatus")
        if not _SID.fullmatch(sid):
            raise MalformedCallback(
                f"the {self.name} status callback has a malformed MessageSid {sid[:40]!r}"
            )
        if status not in STATUS_RANK:
            raise MalformedCallback(
                f"the {self.name} status callback has an unknown MessageStatus {status[:40]!r}"
            )
        error_code = fields.get("ErrorCode") or None
        return [StatusUpdate(self.name, sid, status, error_code, datetime.now(UTC))]

    def parse_inbound(
        self, url: str, form: Mapping[str, str] | Sequence[tuple[str, str]], headers: Mapping[str, str]
    ) -> InboundMessage:
        """A signed incoming-message webhook (``MessageSid``, ``From``, ``To``, ``Body``)."""
        pairs = form_items(form)
        self._verify("inbound message", url, pairs, headers)
        fields = dict(pairs)
        missing = [key for key in ("MessageSid", "From", "To", "Body") if key not in fields]
        if missing or not fields["MessageSid"] or not fields["From"]:
            raise MalformedCallback(
                f"the {self.name} inbound message lacks {', '.join(missing) or 'a value'}"
            )
        return InboundMessage(
            self.name, fields["MessageSid"], fields["From"], fields["To"], fields["Body"], datetime.now(UTC)
        )

    def callback_reply(self) -> tuple[int, str, str]:
        """An empty TwiML response: fine for status callbacks, and sends no reply to inbound SMS."""
        return 200, "text/xml", TWIML_EMPTY
