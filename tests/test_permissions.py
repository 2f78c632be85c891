"""Files and addresses (issue 16, item 5): SMSOPS_HOME is its owner's only, and an app without
sign-in that listens beyond this machine says who can then launch sends and read numbers."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from smsops import cli, config, erasure, ingress, store


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def smsops(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smsops.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "SMSOPS_HOME": str(home)},
        timeout=120,
    )


@pytest.fixture
def loose_umask():
    """The umask most desktops have (022): what smsops must not rely on."""
    before = os.umask(0o022)
    yield
    os.umask(before)


def test_the_command_line_makes_the_home_0700_and_every_file_in_it_0600(tmp_path, loose_umask, monkeypatch):
    monkeypatch.delenv(erasure.SECRET_ENV, raising=False)
    home = tmp_path / "new" / "home"
    assert smsops(home, "demo", "--contacts", "60", "--seed", "3").returncode == 0
    export = tmp_path / "crm.csv"
    export.write_text("phone,first_name\n+79163217458,Зольтан\nnot a number,Анна\n")
    imported = smsops(home, "import", "contacts", str(export), "--rejects", str(home / "rejects.csv"))
    assert imported.returncode == 0, imported.stderr
    erased = smsops(home, "contacts", "erase", "--phone", "+79163217458", "--requested-by", "dpo", "--yes")
    assert erased.returncode == 0, erased.stderr
    assert mode(home) == 0o700
    files = [path for path in home.rglob("*") if path.is_file()]
    assert {"ops.sqlite", "rejects.csv", erasure.KEY_FILE, "erasures.jsonl"} <= {p.name for p in files}
    assert {str(p.relative_to(home)): mode(p) for p in files} == {
        str(p.relative_to(home)): 0o600 for p in files
    }
    assert all(mode(p) == 0o700 for p in home.rglob("*") if p.is_dir())


def test_an_existing_home_open_to_others_is_closed_by_the_next_command(tmp_path, loose_umask):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    assert smsops(home, "status").returncode == 0
    assert mode(home) == 0o700


def test_the_store_and_the_journal_are_their_owners_only_whatever_the_umask(tmp_path, loose_umask):
    conn = store.open_store(tmp_path)
    conn.execute("insert into outbox_decisions (campaign_id, decision, messages, decided_by, decided_at)"
                 " values (1, 'retry', 1, 'x', 'now')")  # fmt: skip
    jconn = ingress.connect(ingress.journal_path(tmp_path))
    try:
        made = sorted(
            p.name for p in tmp_path.iterdir() if p.name.startswith(("ops.sqlite", "ingress.sqlite"))
        )
        assert {"ops.sqlite", "ops.sqlite-wal", "ingress.sqlite", "ingress.sqlite-wal"} <= set(made)
        assert {name: mode(tmp_path / name) for name in made} == {name: 0o600 for name in made}
    finally:
        jconn.close()
        conn.close()


def test_a_command_run_in_process_leaves_the_callers_umask_as_it_was(home, loose_umask):
    assert cli.main(["status"]) == 0
    assert os.umask(0o022) == 0o022


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.5", "localhost", "::1", "[::1]"])
def test_loopback_addresses_are_told_apart_from_the_rest(address):
    assert config.is_loopback(address)
    assert not config.is_loopback("0.0.0.0") and not config.is_loopback("192.168.1.10")
    assert not config.is_loopback("::") and not config.is_loopback("sms.example.ru")


def app_ready_to_start(home: Path) -> None:
    """A store with a contact and a published build, so `smsops run --skip-build` goes straight
    to starting the app."""
    conn = store.open_store(home)
    conn.execute(
        "insert into contacts (contact_id, phone_e164, created_at, updated_at) values (1, '+79990001122', 'now', 'now')"
    )
    conn.close()
    pointer = home / "warehouse" / "current.json"
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(
        json.dumps(
            {
                "build_id": "b",
                "path": str(home / "wh.duckdb"),
                "built_at": "2026-01-01T00:00:00+00:00",
                "seconds": 1,
            }
        )
    )


class Started(Exception):
    """What the test's stand-in for os.execv raises instead of replacing the test process."""


@pytest.mark.parametrize(
    ("address", "warned"), [("0.0.0.0", True), ("192.168.1.10", True), ("127.0.0.1", False)]
)
def test_run_on_an_outside_address_warns_who_can_launch_sends_and_read_numbers(
    home, monkeypatch, capsys, address, warned
):
    app_ready_to_start(home)
    seen: dict[str, int] = {}

    def execv(path, argv):
        seen["umask"] = os.umask(0o077)
        raise Started

    monkeypatch.setattr(os, "execv", execv)
    with pytest.raises(Started):
        cli.main(["run", "--address", address, "--skip-build", "--no-serve"])
    err = capsys.readouterr().err
    log = (home / "serve.log").read_text() if (home / "serve.log").exists() else ""
    if warned:
        for text in (err, log):
            assert f"listens on {address}" in text and "no sign-in yet" in text
            assert "launch paid sends" in text and "phone numbers" in text
    else:
        assert "WARNING" not in err and "WARNING" not in log
    assert seen["umask"] == 0o077  # what the app (Streamlit, after exec) creates is private


def test_serve_on_an_outside_address_warns_on_stderr_and_in_its_log(home):
    out = smsops(home, "serve", "--host", "0.0.0.0", "--port", "0", "--provider", "no-such-provider")
    assert out.returncode == 2
    assert "WARNING" in out.stderr and "listens on 0.0.0.0" in out.stderr and "no sign-in yet" in out.stderr
    quiet = smsops(home, "serve", "--host", "127.0.0.1", "--port", "0", "--provider", "no-such-provider")
    assert quiet.returncode == 2 and "WARNING" not in quiet.stderr
