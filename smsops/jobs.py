"""Slow work off a page's script run: started once by a key, followed by its progress.

A Streamlit script reruns on every click, and a click is meant to answer within a second; a
launch of a million messages, its dry run or the campaign list over a large outbox take longer.
A page starts such work as a job instead, by a key that names it (``"launch:12"``), waits a
moment (:data:`WAIT`) in case it is quick, and otherwise shows the job's progress and the last
finished result until the job is done. The next run of any page, in any browser session of the
same server, finds the same job by its key:

- a key has at most one running job: starting it again returns the one running, so a double
  click on "Launch" starts one launch (:func:`smsops.campaigns.plan` is idempotent as well);
- a finished job's result is kept; with ``fresh_for`` it is read again in the background once
  it is that many seconds old, and the old result is served meanwhile (stale, never blank);
- an exception in the work is kept as the job's error, shown where its result would be.

Jobs run on daemon threads of the process that started them (the app's server): work that must
survive the server (sending) belongs to ``smsops serve``, not here.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

Report = Callable[[float, str], None]
"""``report(fraction, step)``: how far a job has come (0–1) and what it is doing now."""

WAIT = 0.4
"""Seconds a page waits for a job before it shows its progress instead; ``SMSOPS_JOB_WAIT``
overrides it (the tests set it long, so that a page shows its result in the run under test)."""


def _waiting() -> float:
    return float(os.environ.get("SMSOPS_JOB_WAIT", WAIT))


KEEP = 3600.0
"""Seconds a finished job is remembered after it finished, unless asked for again."""


@dataclass(frozen=True, slots=True)
class Status(Generic[T]):
    """A job as a page sees it: its last finished result (or error), and whether it is running."""

    key: str
    running: bool
    fraction: float
    step: str
    result: T | None
    error: BaseException | None
    finished_at: float | None
    """``time.time()`` when the result (or error) was made; None before the first one."""

    @property
    def ready(self) -> bool:
        """A result or an error to show (possibly while a newer one is being made)."""
        return self.finished_at is not None

    @property
    def age(self) -> float | None:
        """Seconds since the result was made."""
        return None if self.finished_at is None else max(0.0, time.time() - self.finished_at)


@dataclass(slots=True)
class _Job:
    key: str
    thread: threading.Thread | None = None
    fraction: float = 0.0
    step: str = ""
    result: Any = None
    error: BaseException | None = None
    finished_at: float | None = None
    touched: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def status(self) -> Status:
        return Status(
            self.key,
            self.running,
            self.fraction,
            self.step,
            self.result,
            self.error,
            self.finished_at,
        )


_jobs: dict[str, _Job] = {}
_lock = threading.Lock()


def key(*parts: object) -> str:
    """A job key for work on this process's ``SMSOPS_HOME``: the same work on another home (a
    test's, a second deployment's) is another job."""
    home = os.path.realpath(os.environ.get("SMSOPS_HOME", "data"))
    return "|".join([home, *map(str, parts)])


def start(key: str, work: Callable[[Report], T], *, fresh_for: float | None = None) -> Status[T]:
    """The job ``key``: the one running, else the last finished one while it is younger than
    ``fresh_for`` seconds (or kept for good when ``fresh_for`` is None), else ``work(report)``
    started now on a thread of its own."""
    with _lock:
        _forget_old()
        job = _jobs.get(key)
        if job is None:
            job = _jobs[key] = _Job(key)
        job.touched = time.monotonic()
        if job.running:
            return job.status()
        stale = job.finished_at is not None and (
            fresh_for is not None and time.time() - job.finished_at > fresh_for
        )
        if job.finished_at is None or stale:
            job.fraction, job.step = 0.0, ""
            job.done.clear()
            job.thread = threading.Thread(target=_run, args=(job, work), name=f"job {key}", daemon=True)
            job.thread.start()
        return job.status()


def wait(key: str, timeout: float | None = None) -> Status | None:
    """The job ``key`` once it has finished a run or ``timeout`` seconds have passed, whichever
    comes first; None when there is no such job."""
    with _lock:
        job = _jobs.get(key)
    if job is None:
        return None
    if job.running:
        job.done.wait(_waiting() if timeout is None else timeout)
    return job.status()


def run(
    key: str, work: Callable[[Report], T], *, fresh_for: float | None = None, timeout: float = WAIT
) -> Status[T]:
    """:func:`start`, then :func:`wait` up to ``timeout`` (:data:`WAIT`) for a run that has no
    result yet."""
    status = start(key, work, fresh_for=fresh_for)
    if status.running and not status.ready:
        status = wait(key, timeout) or status
    return status


def get(key: str) -> Status | None:
    """The job ``key`` as it stands, without starting anything."""
    with _lock:
        job = _jobs.get(key)
        return None if job is None else job.status()


def forget(key: str) -> None:
    """Drop a finished job (a running one finishes, then is forgotten when next looked at)."""
    with _lock:
        job = _jobs.get(key)
        if job is not None and not job.running:
            del _jobs[key]


def forget_all(prefix: str) -> None:
    """Drop every finished job whose key starts with ``prefix`` (after a change that makes their
    results wrong, such as a person's action on the campaign they count)."""
    with _lock:
        for key in [k for k, j in _jobs.items() if k.startswith(prefix) and not j.running]:
            del _jobs[key]


def running(prefix: str = "") -> list[Status]:
    """The jobs running now whose key starts with ``prefix``."""
    with _lock:
        return [job.status() for key, job in _jobs.items() if key.startswith(prefix) and job.running]


def _run(job: _Job, work: Callable[[Report], Any]) -> None:
    def report(fraction: float, step: str) -> None:
        job.fraction, job.step = min(max(float(fraction), 0.0), 1.0), step

    try:
        result = work(report)
    except BaseException as exc:  # kept for the page, which shows it
        job.error, job.result = exc, None
    else:
        job.result, job.error = result, None
    job.fraction = 1.0
    job.finished_at = time.time()
    job.done.set()


@atexit.register
def _drain(timeout: float = 30.0) -> None:
    """At exit, let running jobs end (up to ``timeout`` s): a daemon thread cut off inside DuckDB
    or SQLite at interpreter shutdown can abort the process."""
    deadline = time.monotonic() + timeout
    with _lock:
        threads = [job.thread for job in _jobs.values() if job.running]
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _forget_old() -> None:
    now = time.monotonic()
    for key in [k for k, j in _jobs.items() if not j.running and now - j.touched > KEEP]:
        del _jobs[key]
