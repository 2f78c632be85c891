"""`smsops serve`: one process for everything that listens and sends.

- the webhook app (:func:`smsops.webhooks.create_app`: receipts, replies, link clicks) on a
  loopback port, 127.0.0.1:8600 by default;
- with the ``sandbox`` provider, the sandbox itself where ``SANDBOX_URL`` points
  (127.0.0.1:8765 by default), posting receipts and replies to the webhook app. It runs in a
  process of its own (:class:`SandboxProcess`), as a provider would: in this one its event loop
  took the GIL from the dispatcher's and the receiver's; its limit is at least the sending rate
  asked for (:func:`start_sandbox`);
- the dispatcher (:mod:`smsops.dispatch`) as a service: the due rows of every running campaign,
  receipts requested at the webhook app's status route;
- receipt lookups (:func:`receipt_lookups`): every 30 s, the messages whose receipt is overdue
  (lost while the receiver was down or overloaded) are looked up at the provider;
- a scheduler (:func:`scheduler`): every few seconds it starts the scheduled campaigns whose
  time has come (:func:`smsops.campaigns.start_due`), gives A/B remainders their winner when
  their window has passed (:func:`smsops.campaigns.release_due_winners`), and every
  ``SMSOPS_REFRESH_MINUTES`` starts a warehouse build unless one is running.

Ctrl-C (or SIGTERM) stops the dispatcher first (sends in flight finish and are recorded; claimed
rows not yet sent go back to the outbox), then the servers.

The provider is chosen by ``SMSOPS_PROVIDER`` (``sandbox`` by default) with its credentials from
the environment or ``.streamlit/secrets.toml`` (environment first).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from smsops import campaigns, dispatch, warehouse, webhooks
from smsops import config as smsops_config
from smsops.config import REPO_ROOT
from smsops.providers import ConfigError, Provider, from_config
from smsops.providers.sandbox import SandboxSettings, ServerThread, serve_in_thread

__all__ = [
    "DEFAULT_WEBHOOK_PORT",
    "SandboxProcess",
    "SchedulerState",
    "ServeSettings",
    "Services",
    "describe",
    "load_provider",
    "provider_env",
    "run",
    "sandbox_reachable",
    "scheduler",
    "scheduler_tick",
    "start_sandbox",
    "start_services",
    "webhook_reachable",
]

log = logging.getLogger(__name__)

DEFAULT_WEBHOOK_PORT = 8600
_RESTART_AFTER = 5.0
RECEIPT_LOOKUP_INTERVAL = 30.0
"""Seconds between two passes of the receipt lookup (:func:`smsops.receipts.reconcile_receipts`)."""


SCHEDULER_INTERVAL = 5.0
"""Seconds between two looks for scheduled campaigns and A/B tests to release."""


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """Where to listen and how to send."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_WEBHOOK_PORT
    provider: str | None = None
    """``sandbox``, ``twilio`` or ``smsru``; None: ``$SMSOPS_PROVIDER``, else ``sandbox``."""
    public_url: str | None = None
    """The address providers call the webhook app at, when it is behind a proxy."""
    dispatch: dispatch.DispatchSettings = field(default_factory=dispatch.DispatchSettings)
    scheduler_interval: float = SCHEDULER_INTERVAL
    """Seconds between scheduler ticks (0: no scheduler)."""
    refresh_minutes: float | None = None
    """Rebuild the warehouse this often (0: never); None: ``$SMSOPS_REFRESH_MINUTES``."""
    receipt_lookup_interval: float = RECEIPT_LOOKUP_INTERVAL
    """Seconds between lookups of overdue receipts at the provider (0: none)."""


def provider_env(root: Path | None = None) -> dict[str, object]:
    """Provider settings: ``.streamlit/secrets.toml`` (its top-level values), overridden by the
    environment."""
    values: dict[str, object] = {}
    for folder in (root or Path.cwd(), REPO_ROOT):
        secrets_file = folder / ".streamlit" / "secrets.toml"
        if secrets_file.is_file():
            with secrets_file.open("rb") as fh:
                values = {k: v for k, v in tomllib.load(fh).items() if not isinstance(v, dict)}
            break
    values.update(os.environ)
    return values


def load_provider(name: str | None = None, env: Mapping[str, object] | None = None) -> Provider:
    """The configured provider (``name``, else ``$SMSOPS_PROVIDER``, else the sandbox)."""
    settings = provider_env() if env is None else env
    chosen = name or str(settings.get("SMSOPS_PROVIDER") or "sandbox")
    return from_config(chosen, settings)


def sandbox_reachable(provider: Provider, timeout: float = 1.0) -> bool:
    """Whether the sandbox the provider points at answers its health check."""
    base = getattr(provider, "base_url", "")
    try:
        return httpx.get(f"{base.rstrip('/')}/sandbox/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def webhook_reachable(url: str, timeout: float = 1.0) -> bool:
    try:
        return httpx.get(f"{url.rstrip('/')}/healthz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass(slots=True)
class Services:
    """What :func:`start_services` started, and their addresses."""

    provider: Provider
    webhook_url: str | None = None
    sandbox_url: str | None = None
    servers: list[ServerThread | SandboxProcess] = field(default_factory=list)

    @property
    def status_callback_url(self) -> str | None:
        if self.webhook_url is None:
            return None
        return f"{self.webhook_url}/webhooks/{self.provider.name}/status"

    def close(self) -> None:
        for server in reversed(self.servers):
            server.close()


SANDBOX_CLICK_RATE = 0.08
"""Share of delivered sandbox messages whose simulated recipient follows the link."""
SANDBOX_REPLY_RATE = 0.004
"""Share of delivered sandbox messages whose simulated recipient replies STOP."""


_SANDBOX_PROCESS = """
import contextlib, ctypes, json, logging, os, signal, socket, sys
with contextlib.suppress(OSError, AttributeError):  # the kernel ends it with its parent (Linux)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[2]):
    os._exit(1)
import uvicorn
from smsops.providers.sandbox import SandboxSettings, create_app
fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.load(sys.stdin).items()}
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app(SandboxSettings(**fields))
config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
uvicorn.Server(config).run(sockets=[socket.socket(fileno=int(sys.argv[1]))])
"""


class SandboxProcess:
    """The sandbox served by uvicorn in a process of its own, on ``host:port`` (0: a free port;
    :attr:`url` says which), until :meth:`close` or the death of the process that started it.

    Not a thread, as the webhook app is: the sandbox does a provider's work (an answer to every
    send, a post for every receipt), which never shares the dispatcher's GIL in production; in a
    thread of this process it did, and took it from the dispatcher and the receiver
    (docs/performance.md, "smsops serve as deployed"). The child imports only the sandbox, gets
    its settings on stdin (the token stays off its command line), and runs in a session of its
    own, so a Ctrl-C stops the dispatcher first and the sandbox after, as with a thread. The
    socket is bound here, so a taken port fails at once. On Linux the kernel ends it when the
    thread that started it ends (``PR_SET_PDEATHSIG``): start it from the thread that serves."""

    def __init__(self, settings: SandboxSettings, host: str = "127.0.0.1", port: int = 0) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> SandboxProcess:
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(2048)
            self.port = listener.getsockname()[1]
            fd = listener.fileno()
            self._process = subprocess.Popen(
                [sys.executable, "-c", _SANDBOX_PROCESS, str(fd), str(os.getpid())],
                stdin=subprocess.PIPE,
                pass_fds=[fd],
                start_new_session=True,
            )
        except OSError as exc:
            raise RuntimeError(f"the sandbox cannot listen on {self.host}:{self.port} ({exc})") from None
        finally:
            listener.close()  # the child has its own copy
        assert self._process.stdin is not None
        with self._process.stdin as stdin:
            stdin.write(json.dumps(dataclasses.asdict(self.settings)).encode("utf-8"))
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/sandbox/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the sandbox on {self.host}:{self.port} did not start")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop it (SIGTERM: its app stops, cancelling the posts still pending)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_sandbox(
    provider: Provider,
    inbound_url: str | None,
    link_url: str | None = None,
    *,
    rate_per_second: float | None = None,
) -> SandboxProcess:
    """The sandbox at the address ``provider`` points at, in a process of its own, with the
    provider's credentials, and simulated recipients who click (links served at ``link_url``)
    and sometimes reply STOP. Its rate limit is its default (1,000/s) or ``rate_per_second``,
    the most the dispatcher is set to send, whichever is higher: a sandbox that throttled the
    rate it was started for would only measure its own setting.
    ``SMSOPS_SANDBOX_FAULTS=off``: no simulated outages, late receipts or recipients."""
    parts = urlsplit(getattr(provider, "base_url", ""))
    settings = SandboxSettings(
        account_sid=getattr(provider, "account_sid", SandboxSettings.account_sid),
        auth_token=getattr(provider, "auth_token", SandboxSettings().auth_token),
        inbound_url=inbound_url,
        link_url=link_url,
        click_rate=SANDBOX_CLICK_RATE,
        reply_rate=SANDBOX_REPLY_RATE,
        rate_per_second=max(SandboxSettings().rate_per_second, rate_per_second or 0.0),
    )
    if os.environ.get("SMSOPS_SANDBOX_FAULTS", "").strip().lower() in ("off", "0", "no"):
        # a calm sandbox for browser tests: no outages, receipts at once, nobody acts by themselves
        settings = replace(
            settings, transient_error_rate=0.0, duplicate_rate=0.0, out_of_order_rate=0.0,
            receipt_delay=(0.05, 0.2), click_rate=0.0, reply_rate=0.0,
        )  # fmt: skip
    return SandboxProcess(settings, parts.hostname or "127.0.0.1", parts.port or 80).start()


@contextlib.contextmanager
def start_services(
    home: str | os.PathLike[str] | None,
    provider: Provider,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_WEBHOOK_PORT,
    public_url: str | None = None,
    webhooks_app: bool = True,
    rate_per_second: float | None = None,
) -> Iterator[Services]:
    """Start the webhook app and, for the sandbox provider, the sandbox (admitting at least
    ``rate_per_second``); stop them on exit."""
    services = Services(provider)
    try:
        if webhooks_app:
            app = webhooks.create_app({provider.name: provider}, home=home, public_url=public_url)
            hooks = serve_in_thread(app, host, port)
            services.servers.append(hooks)
            services.webhook_url = public_url.rstrip("/") if public_url else hooks.url
        if provider.is_sandbox:
            inbound = (
                f"{services.webhook_url}/webhooks/{provider.name}/inbound" if services.webhook_url else None
            )
            sandbox = start_sandbox(
                provider, inbound, hooks.url if webhooks_app else None, rate_per_second=rate_per_second
            )
            services.servers.append(sandbox)
            services.sandbox_url = sandbox.url
        yield services
    finally:
        services.close()


@dataclass(slots=True)
class SchedulerState:
    """What the scheduler remembers between ticks."""

    last_build: float | None = None
    """``time.monotonic()`` when it last started a build (None: never)."""
    builds: list[object] = field(default_factory=list)
    """The build processes it started (a ``subprocess.Popen`` each)."""


def scheduler_tick(
    home: str | os.PathLike[str] | None,
    state: SchedulerState,
    *,
    refresh_minutes: float = 0.0,
    now: float | None = None,
) -> dict[str, object]:
    """One look: start due campaigns, release due A/B winners, and start a warehouse build when
    ``refresh_minutes`` have passed since the last one this scheduler started (none while a build
    is running). What it did, for the log."""
    import time

    done: dict[str, object] = {}
    started = campaigns.start_due(home=home)
    if started:
        done["started"] = started
    released = campaigns.release_due_winners(home=home)
    if released:
        done["released"] = released
    clock = time.monotonic() if now is None else now
    if refresh_minutes > 0 and (state.last_build is None or clock - state.last_build >= refresh_minutes * 60):
        for proc in [p for p in state.builds if p.poll() is not None]:  # type: ignore[attr-defined]
            state.builds.remove(proc)
        if warehouse.build_running(home) or state.builds:
            done["build"] = "already running"
        else:
            state.builds.append(warehouse.build_in_background(home))
            state.last_build = clock
            done["build"] = "started"
    return done


async def scheduler(
    home: str | os.PathLike[str] | None,
    stop: asyncio.Event,
    *,
    interval: float = SCHEDULER_INTERVAL,
    refresh_minutes: float = 0.0,
) -> None:
    """:func:`scheduler_tick` every ``interval`` seconds until ``stop`` is set; a failing tick is
    logged and the next one tries again."""
    state = SchedulerState()
    while not stop.is_set():
        try:
            done = await asyncio.to_thread(scheduler_tick, home, state, refresh_minutes=refresh_minutes)
        except Exception:
            log.exception("scheduler tick failed; trying again in %.0f s", interval)
        else:
            for key, value in done.items():
                log.info("scheduler: %s %s", key, value)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def receipt_lookups(
    home: str | os.PathLike[str] | None,
    provider: Provider,
    stop: asyncio.Event,
    *,
    interval: float = RECEIPT_LOOKUP_INTERVAL,
) -> None:
    """Every ``interval`` seconds, ask the provider about messages whose receipt is overdue (lost
    while the receiver was down or overloaded) until ``stop`` is set. Refused credentials pause
    it for ten minutes; a failing pass is logged and the next one tries again."""
    from smsops import receipts

    try:
        wait = receipts.receipt_wait(provider.name)
    except ConfigError as exc:
        log.error("receipt lookups are off: %s", exc)
        return
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0)) as client:
        while not stop.is_set():
            pause = interval
            try:
                report = await receipts.reconcile_receipts(home, provider, client, wait=wait)
            except Exception:
                log.exception("the receipt lookup failed; trying again in %.0f s", interval)
            else:
                if report.looked_up:
                    log.info(
                        "receipt lookups: %d asked, %d recovered, %d still pending, %d unknown to %s, %d failed",
                        report.looked_up, report.recovered, report.still_pending, report.not_found,
                        provider.name, report.errors,
                    )  # fmt: skip
                if report.stopped == "credentials":
                    log.error("receipt lookups paused for 10 minutes: %s", report.error)
                    pause = 600.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)


async def run(
    home: str | os.PathLike[str] | None = None,
    settings: ServeSettings | None = None,
    *,
    stop: asyncio.Event | None = None,
    ready: Callable[[Services], None] | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGINT / SIGTERM when run from the main thread)."""
    settings = settings or ServeSettings()
    stop = stop or asyncio.Event()
    provider = load_provider(settings.provider)
    loop = asyncio.get_running_loop()
    handled: list[int] = []
    tasks: list[asyncio.Task[None]] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    try:
        with start_services(
            home, provider, host=settings.host, port=settings.port, public_url=settings.public_url,
            rate_per_second=settings.dispatch.rate_per_second,
        ) as services:  # fmt: skip
            if ready is not None:
                ready(services)
            options = replace(settings.dispatch, status_callback_url=services.status_callback_url)
            if settings.receipt_lookup_interval > 0:
                tasks.append(
                    asyncio.create_task(
                        receipt_lookups(home, provider, stop, interval=settings.receipt_lookup_interval)
                    )
                )
            if settings.scheduler_interval > 0:
                refresh = (
                    smsops_config.refresh_minutes()
                    if settings.refresh_minutes is None
                    else settings.refresh_minutes
                )
                tasks.append(
                    asyncio.create_task(
                        scheduler(home, stop, interval=settings.scheduler_interval, refresh_minutes=refresh)
                    )
                )
            while not stop.is_set():
                try:
                    report = await dispatch.run(home, provider, options, stop=stop)
                except Exception:
                    log.exception("the dispatcher stopped unexpectedly; restarting in %.0f s", _RESTART_AFTER)
                else:
                    if report.error:
                        log.error("%s", report.error)
                    if stop.is_set():
                        break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), _RESTART_AFTER)
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(Exception):
                await task
        for signum in handled:
            loop.remove_signal_handler(signum)


def describe(services: Services) -> list[str]:
    """Lines for the terminal: what runs where."""
    lines = []
    if services.webhook_url:
        lines.append(
            f"webhooks   {services.webhook_url}/webhooks/{services.provider.name}/status  (receipts)"
        )
        lines.append(f"           {services.webhook_url}/webhooks/{services.provider.name}/inbound (replies)")
        lines.append(f"           {services.webhook_url}/l/<token>                         (link clicks)")
    if services.sandbox_url:
        lines.append(f"sandbox    {services.sandbox_url}  (simulated provider: no real SMS is sent)")
        lines.append(f"           {services.sandbox_url}/sandbox/messages  (what it accepted)")
    lines.append(f"dispatcher sending the due messages of running campaigns through {services.provider.name}")
    lines.append("scheduler  starting scheduled campaigns, releasing A/B winners, refreshing the warehouse")
    return lines
