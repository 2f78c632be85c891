"""Helpers for the browser tests: a real Streamlit server on loopback, Debian's Chromium."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from smsops.cli import streamlit_argv

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child: the server gets SIGTERM when the test process goes away."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextmanager
def _running(argv: list[str], env: dict[str, str], health: str, timeout: float, log) -> Iterator[None]:
    """Run ``argv`` (output to ``log``, a file opened for writing bytes) until ``health``
    answers 200; stop it on exit. It dies with the test process, too."""
    proc = subprocess.Popen(
        argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
    )
    name = " ".join(argv[1:4])
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.flush()
                raise RuntimeError(f"{name} exited early:\n{Path(log.name).read_text()[-3000:]}")
            try:
                if httpx.get(health, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not answer {health}")
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def streamlit_server(home: Path, timeout: float = 60) -> Iterator[str]:
    """Start the app on a free loopback port over ``home``; yield its URL; stop it."""
    port = free_port()
    env = {**os.environ, "SMSOPS_HOME": str(home)}
    argv = streamlit_argv("127.0.0.1", port, "--server.fileWatcherType", "none")
    url = f"http://127.0.0.1:{port}"
    with (
        open(home / f"streamlit-{port}.log", "wb") as log,
        _running(argv, env, f"{url}/_stcore/health", timeout, log),
    ):
        yield url


@contextmanager
def chromium_page() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            yield page
        finally:
            browser.close()


def wait_for_script(page, timeout: float = 60_000) -> None:
    page.wait_for_selector("[data-testid=stApp][data-test-script-state=notRunning]", timeout=timeout)


@contextmanager
def smsops_serve(home: Path, port: int | None = None, **env: str) -> Iterator[str]:
    """`smsops serve` over ``home`` on free loopback ports (the webhook app on ``port`` when
    given), with a calm sandbox (no simulated outages or late receipts) and no scheduled
    refresh; yields the webhook app's URL. ``env`` adds to or overrides the server's environment."""
    port, sandbox_port = port or free_port(), free_port()
    full_env = {
        **os.environ,
        "SMSOPS_HOME": str(home),
        "SMSOPS_PROVIDER": "sandbox",
        "SANDBOX_URL": f"http://127.0.0.1:{sandbox_port}",
        "SMSOPS_SANDBOX_FAULTS": "off",
        "SMSOPS_REFRESH_MINUTES": "0",
        **env,
    }
    argv = [sys.executable, "-m", "smsops.cli", "serve", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with open(home / "serve.log", "wb") as log, _running(argv, full_env, f"{url}/healthz", 30, log):
        yield url
