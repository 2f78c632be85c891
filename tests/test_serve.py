"""`smsops serve`'s sandbox: a process of its own, at least as fast as the rate asked for, and
never outliving the process that started it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from smsops import serve
from smsops.providers import from_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sandbox_at(port: int):
    return from_config("sandbox", {"SANDBOX_URL": f"http://127.0.0.1:{port}"})


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/sandbox/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def pid_listening_on(port: int) -> int | None:
    """The process holding a listening socket on ``port`` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return int(pid)
    return None


def test_the_sandbox_runs_in_a_process_of_its_own_and_stops_with_close():
    port = free_port()
    with serve.start_sandbox(sandbox_at(port), None) as sandbox:
        assert sandbox.url == f"http://127.0.0.1:{port}" and answers(sandbox.url)
        holder = pid_listening_on(port)
        assert holder is not None and holder != os.getpid()
        assert os.getsid(holder) != os.getsid(0)  # a Ctrl-C in the terminal is not its to take
    assert not answers(f"http://127.0.0.1:{port}")


def test_a_taken_port_fails_at_once_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
            serve.start_sandbox(sandbox_at(port), None)


@pytest.mark.parametrize(("rate", "limit"), [(None, 1_000), (150, 1_000), (2_000, 2_000)])
def test_the_sandbox_admits_at_least_the_rate_serve_sends_at(rate, limit):
    with serve.start_sandbox(sandbox_at(free_port()), None, rate_per_second=rate) as sandbox:
        assert sandbox.settings.rate_per_second == limit


def test_the_sandbox_does_not_outlive_a_serve_killed_with_sigkill(tmp_path):
    port = free_port()
    script = textwrap.dedent(
        f"""
        import time
        from smsops import serve
        from smsops.providers import from_config

        serve.start_sandbox(from_config("sandbox", {{"SANDBOX_URL": "http://127.0.0.1:{port}"}}), None)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        child = pid_listening_on(port)
        assert child is not None and child != parent.pid
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while answers(f"http://127.0.0.1:{port}") or pid_listening_on(port) is not None:
            assert time.monotonic() < deadline, "the sandbox outlived the process that started it"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
