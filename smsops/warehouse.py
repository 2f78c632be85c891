"""The warehouse: dbt builds it, everyone else reads a published snapshot.

DuckDB allows one read-write process per file and refuses even read-only opens while a
writer holds it. So a build never touches the file readers use: it copies the current
snapshot (keeping incremental models incremental) to a work file, brings the snapshot's
copy of the operational store up to date (``dbt_plugin.sync``: only what changed, where
that is safe), runs dbt on that file in a child process, and on success renames it to a
new snapshot file and atomically replaces a small pointer (``current.json``: build id,
path, time). Readers resolve the pointer, open a short read-only connection, fetch
everything and close. Old snapshots are pruned.

The work file always has the same path (``warehouse/building.duckdb``, one build at a
time), so dbt's profile does not change between builds and dbt can parse the project
partially instead of whole (about 2.5 s of every build).

After an erasure (or a restore) the copy is not made: the old file still holds the erased
values, in its tables and in its free blocks. The first build that sees the store's erasure
mark move (``dbt_plugin.erasure_mark``, recorded in the pointer) or finds
``fresh-build-required`` starts from an empty file, clears dbt's logs and target folder
first, and once it is published deletes every other warehouse file, the development copy
included (DESIGN.md invariant 10). Snapshots and the pointer are readable by their owner only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from smsops import dbt_plugin, store
from smsops.config import Paths, dbt_project_dir, duckdb_settings, paths, private_file
from smsops.i18n import N_, _

KEEP_SNAPSHOTS = 3

# What a campaign refresh rebuilds (dbt selection syntax): the message-side marts, what they
# read from the operational store and what reads them, but not the contact models
# (dim_contacts and its consent and RFM intermediates), the slowest part of a full build on
# a large base. Their engagement columns catch up at the next full build.
REFRESH_SELECT = ("+fct_messages+", "+fct_replies")

# The operational tables the models of REFRESH_SELECT read: a refresh loads only these
# (the others keep what the previous snapshot holds, as the models built from them do).
# A refresh that ran a model reading another table fails instead of publishing stale marts.
REFRESH_SOURCES = (
    "campaigns",
    "messages",
    "message_status_events",
    "clicks",
    "inbound_messages",
    "orders",
    "consent_events",
)

# ``dbt_plugin.erasure_mark`` of a store in which nobody was ever erased.
NO_ERASURES = "0|None|0"

# The file a build works on before it becomes a snapshot (see the module docstring).
WORK_FILE = "building.duckdb"


class WarehouseError(RuntimeError):
    """The warehouse has not been built yet, or a query against it failed."""


class BuildError(RuntimeError):
    """``dbt build`` failed; the published snapshot is unchanged."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail


class BuildBusy(RuntimeError):
    """Another build holds the build lock."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One published warehouse build."""

    build_id: str
    path: Path
    built_at: datetime
    seconds: float
    loads: tuple[dbt_plugin.Load, ...] = field(default=(), compare=False)
    """How the build loaded each operational table (known only to the call that built it)."""
    erasure_mark: str | None = None
    """The store's erasure mark when the build read it (None in pointers older than it)."""
    purged: tuple[Path, ...] = field(default=(), compare=False)
    """Warehouse files a build after an erasure deleted (known only to the call that built it)."""


def current(home: str | os.PathLike[str] | None = None) -> Snapshot | None:
    """The published snapshot, or None before the first successful build."""
    pointer = paths(home).warehouse_pointer
    try:
        data = json.loads(pointer.read_text())
    except FileNotFoundError:
        return None
    return Snapshot(
        build_id=data["build_id"],
        path=Path(data["path"]),
        built_at=datetime.fromisoformat(data["built_at"]),
        seconds=float(data["seconds"]),
        erasure_mark=data.get("erasure_mark"),
    )


@contextmanager
def _build_lock(p: Paths, wait: bool) -> Iterator[None]:
    p.warehouse_dir.mkdir(parents=True, exist_ok=True)
    with open(p.build_lock, "a+") as fh:
        flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fh, flags)
        except BlockingIOError:
            raise BuildBusy("a warehouse build is already running; try again when it finishes") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def dbt_command(args: Sequence[str], p: Paths, warehouse_path: Path) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run dbt against ``warehouse_path``."""
    project = dbt_project_dir()
    argv = [
        sys.executable, "-m", "dbt.cli.main", *args,
        "--project-dir", str(project),
        "--profiles-dir", str(project),
        "--target-path", str(p.dbt_artifacts / "target"),
        "--log-path", str(p.dbt_artifacts / "logs"),
    ]  # fmt: skip
    env = {
        **os.environ,
        "SMSOPS_HOME": str(p.home),
        "SMSOPS_WAREHOUSE_PATH": str(warehouse_path),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    }
    return argv, env


def _store_erasure_mark(p: Paths) -> str:
    """The operational store's erasure mark now (it moves with every erasure)."""
    conn = store.connect(p.ops_store)
    try:
        store.create_schema(conn)
        return dbt_plugin.erasure_mark(conn.cursor())
    finally:
        conn.close()


def require_fresh_build(home: str | os.PathLike[str] | None = None) -> None:
    """Make the next build start from an empty warehouse file and then delete every other
    warehouse file (what an erasure and a restore ask for)."""
    private_file(paths(home).fresh_build_marker)


def _starts_fresh(p: Paths, previous: Snapshot | None, mark: str) -> bool:
    """Whether this build must not start from a copy of the published snapshot: it holds
    something erased since it was built."""
    if p.fresh_build_marker.exists():
        return True
    if previous is None:
        return False
    if previous.erasure_mark is None:  # a pointer from before the mark: only if anyone was erased
        return mark != NO_ERASURES
    return previous.erasure_mark != mark


def _clear_dbt_artifacts(p: Paths) -> None:
    """dbt's logs and target folder of earlier builds: messages of a failed test or contract
    may quote values."""
    for folder in (p.dbt_artifacts / "logs", p.dbt_artifacts / "target"):
        shutil.rmtree(folder, ignore_errors=True)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    Path(str(path) + ".wal").unlink(missing_ok=True)


def _load_sources(p: Paths, work: Path, tables: Sequence[str], full: bool) -> tuple[dbt_plugin.Load, ...]:
    """Bring the work file's ``ops`` tables up to date with the operational store."""
    conn = duckdb.connect(str(work), config=duckdb_settings())
    try:
        return tuple(dbt_plugin.sync(conn, p.ops_store, tables, full=full))
    finally:
        conn.close()


def _unloaded_sources(p: Paths, loaded: Sequence[str]) -> set[str]:
    """Operational tables that a model of the last dbt run read but the build did not load."""
    target = p.dbt_artifacts / "target"
    ran = {r["unique_id"] for r in json.loads((target / "run_results.json").read_text())["results"]}
    nodes = json.loads((target / "manifest.json").read_text())["nodes"]
    read = {
        parent.rsplit(".", 1)[-1]
        for uid in ran
        if uid in nodes
        for parent in nodes[uid].get("depends_on", {}).get("nodes", ())
        if parent.startswith("source.smsops.ops.")
    }
    return read - set(loaded)


def build(
    home: str | os.PathLike[str] | None = None,
    *,
    full_refresh: bool = False,
    select: Sequence[str] | None = None,
    tests: bool = True,
    wait: bool = True,
    echo: bool = False,
) -> Snapshot:
    """Run ``dbt build`` into a new snapshot file and publish it atomically.

    One build at a time (a lock file); with ``wait=False`` a concurrent call raises
    BuildBusy instead of queueing. On failure the published snapshot stays as it was.
    ``select`` (dbt selection syntax, e.g. ``REFRESH_SELECT``) rebuilds only those nodes, and
    ``fct_messages`` always (see ``ops._loads``); the others keep what the previous snapshot holds, so it needs one (and no
    ``full_refresh``). ``tests=False`` runs the models only (``dbt run``): contracts are
    still enforced, the data and unit tests wait for the next full build.
    """
    p = paths(home)
    if select is not None:
        if not select or not all(isinstance(item, str) and item.strip() for item in select):
            raise ValueError(f"select must name at least one dbt node or selector, got {select!r}")
        if full_refresh:
            raise ValueError("select and full_refresh do not mix: a full refresh rebuilds every model")
        if not any("fct_messages" in item for item in select):
            # the loads this build makes move ops._loads on, and fct_messages recomputes what
            # was loaded since its last build: skipping it would lose those rows for good
            select = (*select, "fct_messages")
    with _build_lock(p, wait):
        previous = current(p.home)
        build_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "_" + uuid.uuid4().hex[:6]
        target = p.warehouse_dir / f"wh_{build_id}.duckdb"
        work = p.warehouse_dir / WORK_FILE
        _remove(work)  # what a build that died left behind
        mark = _store_erasure_mark(p)  # read before the load: an erasure during it moves it again
        fresh = _starts_fresh(p, previous, mark)
        if fresh:  # nothing of the old file may be carried over: every model is built anew
            select = None
            _clear_dbt_artifacts(p)
        start_from = (
            previous.path
            if previous is not None and previous.path.exists() and not (full_refresh or fresh)
            else None
        )
        if start_from is None and select is not None:
            raise WarehouseError(
                "a selective build needs a published snapshot to start from: run `smsops build`"
            )
        args = [
            "build" if tests or start_from is None else "run",
            # an empty file needs the seeds, which `dbt run` leaves out
            *(["--exclude-resource-type", "test", "unit_test"] if not tests and start_from is None else []),
            *(["--full-refresh"] if full_refresh else []),
            *(["--select", *select] if select else []),
        ]
        argv, env = dbt_command(args, p, work)
        gate = p.warehouse_dir / (WORK_FILE + ".loading")
        env[dbt_plugin.PRELOADED_ENV] = "1"  # the sources keep the tables loaded here
        env[dbt_plugin.LOAD_GATE_ENV] = str(gate)
        tables = REFRESH_SOURCES if select is not None else dbt_plugin.SOURCES
        started = time.perf_counter()
        try:
            with open(gate, "a+") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                # dbt starts (seconds of imports and parsing) while the tables load; its
                # plugin waits for this lock before dbt opens the work file
                dbt = subprocess.Popen(
                    argv,
                    cwd=dbt_project_dir(),
                    env=env,
                    stdout=None if echo else subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                try:
                    if start_from is not None:
                        shutil.copyfile(start_from, work)
                    loads = _load_sources(p, work, tables, full_refresh)
                except BaseException:
                    dbt.kill()
                    dbt.wait()
                    raise
                finally:
                    fcntl.flock(held, fcntl.LOCK_UN)
            try:
                output, _ = dbt.communicate()
            except BaseException:
                dbt.kill()
                dbt.wait()
                raise
            if dbt.returncode != 0:
                tail = "\n".join((output or "").splitlines()[-40:])
                raise BuildError(
                    f"dbt build failed (exit {dbt.returncode}); published snapshot unchanged", tail
                )
            missing = _unloaded_sources(p, tables)
            if missing:
                raise BuildError(
                    f"dbt read operational tables this build did not load ({', '.join(sorted(missing))}):"
                    " add them to warehouse.REFRESH_SOURCES (or dbt_plugin.SOURCES); published snapshot unchanged",
                    "",
                )
        except BaseException:
            _remove(work)
            raise
        for path in (work, Path(str(work) + ".wal")):
            if path.exists():
                path.chmod(0o600)
        if fresh:  # say why each table was read whole: not "never loaded" but what made the build fresh
            why = (
                "an erasure since the last load"
                if previous is not None and previous.erasure_mark != mark
                else "a fresh build was asked for (an erasure or a restore)"
            )
            loads = tuple(replace(load, reason=why) if load.how == "full" else load for load in loads)
        os.replace(work, target)
        if Path(str(work) + ".wal").exists():
            os.replace(str(work) + ".wal", str(target) + ".wal")
        seconds = round(time.perf_counter() - started, 3)
        snapshot = Snapshot(
            build_id=build_id,
            path=target,
            built_at=datetime.now(UTC),
            seconds=seconds,
            loads=loads,
            erasure_mark=mark,
        )
        _publish(p, snapshot)
        if fresh:
            removed = _remove_all_but(p, snapshot.path)
            p.fresh_build_marker.unlink(missing_ok=True)
            return replace(snapshot, purged=tuple(removed))
        _prune(p, keep=snapshot.path)
        return snapshot


def refresh(home: str | os.PathLike[str] | None = None, *, wait: bool = True, echo: bool = False) -> Snapshot:
    """Bring campaign results up to date quickly: rebuild the message-side marts
    (``REFRESH_SELECT``) on top of the published snapshot. ``fct_messages`` is incremental,
    so only messages that something new could have changed are recomputed. Data tests are
    left to the next full build (contracts still hold): on the 1M demo base they cost a
    quarter of the refresh."""
    return build(home, select=REFRESH_SELECT, tests=False, wait=wait, echo=echo)


def _publish(p: Paths, snapshot: Snapshot) -> None:
    tmp = private_file(p.warehouse_pointer.with_suffix(f".{os.getpid()}.tmp"))
    tmp.write_text(
        json.dumps(
            {
                "build_id": snapshot.build_id,
                "path": str(snapshot.path),
                "built_at": snapshot.built_at.isoformat(),
                "seconds": round(snapshot.seconds, 3),
                "erasure_mark": snapshot.erasure_mark,
            }
        )
    )
    os.replace(tmp, p.warehouse_pointer)


def _remove_all_but(p: Paths, keep: Path) -> list[Path]:
    """Delete every warehouse file but ``keep`` (older snapshots, the development copy, what a
    build or DuckDB left behind). A reader still holding one keeps its open inode until it
    closes it; new readers already follow the pointer."""
    removed = []
    for path in sorted(p.warehouse_dir.iterdir()):
        if path == keep or path.name == keep.name + ".wal" or path.suffix not in (".duckdb", ".wal", ".tmp"):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _prune(p: Paths, keep: Path) -> None:
    """Remove all but the newest snapshots. A reader still holding an old file keeps its
    open inode; new readers already follow the pointer."""
    files = sorted(p.warehouse_dir.glob("wh_*.duckdb"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in files[KEEP_SNAPSHOTS:]:
        if old != keep:
            _remove(old)


@contextmanager
def connect(home: str | os.PathLike[str] | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short read-only connection to the published snapshot."""
    snapshot = current(home)
    if snapshot is None:
        raise WarehouseError("the warehouse has not been built yet: run `smsops build`")
    conn = duckdb.connect(str(snapshot.path), read_only=True, config=duckdb_settings())
    try:
        yield conn
    finally:
        conn.close()


def query(sql: str, params: Sequence[Any] | dict[str, Any] | None = None, home=None) -> pd.DataFrame:
    """Run one read-only query of the app's own against the published snapshot, fully fetched
    (SQL a person typed goes through :func:`user_query`)."""
    with connect(home) as conn:
        try:
            return conn.execute(sql, params or []).df()
        except duckdb.Error as exc:
            raise WarehouseError(f"query failed: {exc}") from exc


# ---------------------------------------------------------------------------------------
# SQL a person typed (`smsops query`): bounded, and reading the published warehouse only
# (DESIGN.md invariant 11). The app's own SQL goes through :func:`query` above.

USER_ROW_LIMIT = 100_000
"""Rows :func:`user_query` returns at most unless told otherwise (``smsops query --limit``)."""
USER_SECONDS = 30.0
"""Time a user's query may run, fetching included, unless told otherwise (``--timeout``)."""
USER_MEMORY_LIMIT = "1GB"
"""DuckDB's memory limit for a user's query (``--memory``)."""

# What a user's statement may be: a read. DESCRIBE, SHOW and SUMMARIZE parse as SELECT.
_READS = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})
_WHY_NOT = {
    duckdb.StatementType.COPY: N_("writes files"),
    duckdb.StatementType.COPY_DATABASE: N_("writes files"),
    duckdb.StatementType.EXPORT: N_("writes files"),
    duckdb.StatementType.ATTACH: N_("opens another database"),
    duckdb.StatementType.DETACH: N_("closes the warehouse"),
    duckdb.StatementType.LOAD: N_("installs or loads an extension"),
    duckdb.StatementType.EXTENSION: N_("installs or loads an extension"),
    duckdb.StatementType.SET: N_("changes a setting, and the limits are fixed"),
    duckdb.StatementType.VARIABLE_SET: N_("changes a setting, and the limits are fixed"),
    duckdb.StatementType.PRAGMA: N_(
        "can change settings, and the limits are fixed (for information, select * from"
        " pragma_table_info('name'), describe, show tables and summarize work)"
    ),
    duckdb.StatementType.CALL: N_("can change state (select * from the table function works)"),
}
_CHANGES = N_("changes data, and the warehouse is read-only")
_LEADING_COMMENTS = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/)*", re.DOTALL)
# Settings applied before the configuration is locked; their order matters (the temporary
# directory cannot be changed once external access is off, nothing once locked).
_LOCKDOWN = (
    "set temp_directory = ''",  # no spilling to disk: a query over its memory limit fails instead
    "set autoinstall_known_extensions = false",
    "set autoload_known_extensions = false",
    "set allow_community_extensions = false",
    "set python_enable_replacements = false",  # no reading the caller's Python variables
    "set enable_external_access = false",  # no files, no other databases, no extensions
)


class QueryRefused(WarehouseError):
    """A user's query that is not run, or is stopped: it would write, read outside the
    warehouse, change a setting, or it went past its time or memory limit. The message
    names what and why; :meth:`localized` reads it in the current language."""

    def __init__(self, message: str, /, **values: Any) -> None:
        super().__init__(message.format(**values) if values else message)
        self.template = message
        self.values = values

    def localized(self) -> str:
        """The message in the current language."""
        values = {k: _(v) if k == "reason" else v for k, v in self.values.items()}
        return _(self.template).format(**values)


@dataclass(frozen=True, slots=True)
class QueryResult:
    """What :func:`user_query` fetched: at most ``limit`` rows of the published snapshot."""

    frame: pd.DataFrame
    limit: int
    truncated: bool
    """True when the query had more rows than ``limit`` (only the first ``limit`` are here)."""
    build_id: str


def user_query(
    sql: str,
    *,
    limit: int = USER_ROW_LIMIT,
    seconds: float = USER_SECONDS,
    memory_limit: str = USER_MEMORY_LIMIT,
    threads: int | None = None,
    home: str | os.PathLike[str] | None = None,
) -> QueryResult:
    """Run one SQL statement a person typed against the published snapshot, bounded.

    Only a read (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) runs, on a connection that
    sees the snapshot and nothing else: no files (``enable_external_access=false``), no
    extensions, no other databases, and its limits (memory, threads, time) locked. It is
    stopped after ``seconds`` (timer thread and DuckDB's own ``max_execution_time``), and
    ``limit + 1`` rows at most are fetched, chunk by chunk. Raises :class:`QueryRefused` for
    what it refuses or stops, :class:`WarehouseError` for any other failure.
    """
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"limit must be a whole number of rows ≥ 1, got {limit!r}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    snapshot = current(home)
    if snapshot is None:
        raise WarehouseError("the warehouse has not been built yet: run `smsops build`")
    conn = _bounded_connection(snapshot.path, seconds, memory_limit, threads)

    def stop() -> None:
        with contextlib.suppress(duckdb.Error):  # already closed
            conn.interrupt()

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    try:
        _check_read_only(conn, sql)
        timer.start()
        try:
            frame, truncated = _fetch_at_most(conn.execute(sql), limit)
        except duckdb.InterruptException as exc:
            raise QueryRefused(
                N_("the query was stopped at its time limit ({seconds:g} s): narrow it down, or allow"
                   " more time with --timeout"),
                seconds=seconds,
            ) from exc  # fmt: skip
        except duckdb.OutOfMemoryException as exc:
            raise QueryRefused(
                N_("the query was stopped at its memory limit ({memory}): narrow it down, or allow"
                   " more with --memory"),
                memory=memory_limit,
            ) from exc  # fmt: skip
        except duckdb.PermissionException as exc:
            raise QueryRefused(
                N_("refused: the query reaches outside the warehouse ({detail}); smsops query reads"
                   " the published warehouse and nothing else"),
                detail=_first_line(exc),
            ) from exc  # fmt: skip
        except duckdb.Error as exc:
            if "configuration has been locked" in str(exc):
                raise QueryRefused(
                    N_(
                        "refused: the query changes a setting ({detail}); the limits of smsops query are fixed"
                    ),
                    detail=_first_line(exc),
                ) from exc
            raise WarehouseError(f"query failed: {exc}") from exc
    finally:
        timer.cancel()
        conn.close()
    return QueryResult(frame=frame, limit=limit, truncated=truncated, build_id=snapshot.build_id)


def _bounded_connection(
    path: Path, seconds: float, memory_limit: str, threads: int | None
) -> duckdb.DuckDBPyConnection:
    """An in-memory database with ``path`` attached read-only as its default catalog, then
    external access switched off, the limits set and the configuration locked. (Attaching
    instead of opening ``path`` also keeps clear of DuckDB's per-file instance cache, whose
    other connections in this process have other settings.)"""
    if threads is None:
        threads = int(duckdb_settings()["threads"])
    try:
        conn = duckdb.connect(":memory:", config={"memory_limit": memory_limit, "threads": threads})
    except duckdb.Error as exc:
        raise ValueError(
            f"memory limit {memory_limit!r}: give a size such as '512MB' or '2GB' ({exc})"
        ) from None
    try:
        quoted = str(path).replace("'", "''")
        conn.execute(f"attach '{quoted}' as warehouse (read_only)")
        conn.execute("use warehouse")
        for statement in _LOCKDOWN:
            conn.execute(statement)
        conn.execute(f"set max_execution_time = {max(1, round(seconds * 1000))}")
        conn.execute("set lock_configuration = true")
    except BaseException:
        conn.close()
        raise
    return conn


def _check_read_only(conn: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse, before anything runs, what is not one read."""
    try:
        statements = conn.extract_statements(sql)
    except duckdb.Error as exc:
        raise WarehouseError(f"query failed: {exc}") from exc
    if len(statements) != 1:
        raise QueryRefused(
            N_("refused: smsops query runs one statement at a time, got {count}"), count=len(statements)
        )
    kind = statements[0].type
    if kind not in _READS:
        raise QueryRefused(
            N_("refused: {statement} {reason}; smsops query is read-only: it runs one SELECT (or WITH,"
               " DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) on the published warehouse"),
            statement=_keyword(statements[0].query) or kind.name.replace("_", " "),
            reason=_WHY_NOT.get(kind, _CHANGES),
        )  # fmt: skip


def _keyword(sql: str) -> str:
    """The statement's first word in capitals ("COPY", "FORCE INSTALL" …), after any comments."""
    match = re.match(r"(?:force\s+)?[a-z]+", sql[_LEADING_COMMENTS.match(sql).end() :], re.IGNORECASE)
    return match.group().upper() if match else ""


def _fetch_at_most(result: duckdb.DuckDBPyConnection, limit: int) -> tuple[pd.DataFrame, bool]:
    """The first ``limit`` rows of a streaming ``result`` and whether there were more; never
    more than one chunk past ``limit + 1`` rows is fetched."""
    chunks: list[pd.DataFrame] = []
    rows = 0
    while rows <= limit:
        chunk = result.fetch_df_chunk(16)  # 16 vectors: up to 32,768 rows
        if not len(chunk):
            if not chunks:
                chunks.append(chunk)  # the columns of an empty result
            break
        chunks.append(chunk)
        rows += len(chunk)
    frame = chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)
    return frame.iloc[:limit], rows > limit


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def build_in_background(
    home: str | os.PathLike[str] | None = None, *, refresh: bool = False, wait: bool = False
) -> subprocess.Popen:
    """Start ``smsops build`` (``--refresh`` with ``refresh``: :func:`refresh`) as a separate
    process (a page must not run a build itself). It gives up when another build is running,
    unless ``wait``: then it builds after that one (which may have loaded the operational
    store before a change the caller needs in the marts, such as an import)."""
    p = paths(home)
    p.dbt_artifacts.mkdir(parents=True, exist_ok=True)
    log = open(p.dbt_artifacts / "background-build.log", "ab")  # noqa: SIM115 — the child owns it
    env = {**os.environ, "SMSOPS_HOME": str(p.home)}
    flags = [*([] if wait else ["--no-wait"]), *(["--refresh"] if refresh else [])]
    return subprocess.Popen(
        [sys.executable, "-m", "smsops.cli", "build", *flags],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def build_running(home: str | os.PathLike[str] | None = None) -> bool:
    """True while a build holds the build lock."""
    p = paths(home)
    if not p.build_lock.exists():
        return False
    with open(p.build_lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def purge_snapshots(home: str | os.PathLike[str] | None = None) -> list[Path]:
    """Delete every warehouse file but the published snapshot (older snapshots and the
    development copy), e.g. after an erasure: they still hold what was erased."""
    p = paths(home)
    snapshot = current(home)
    removed = []
    # a build's work file too, unless a build is using it (it is removed when that build ends)
    work = [] if build_running(home) else [p.warehouse_dir / WORK_FILE]
    for path in [*p.warehouse_dir.glob("wh_*.duckdb"), p.warehouse_dir / "dev.duckdb", *work]:
        if path.exists() and (snapshot is None or path != snapshot.path):
            path.unlink()
            Path(str(path) + ".wal").unlink(missing_ok=True)
            removed.append(path)
    return removed
