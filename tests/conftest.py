"""Shared fixtures: small real stores and one real warehouse build per test session."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from smsops import demo, i18n, warehouse

# The screens speak Russian unless told otherwise; the suite reads them in English (a deployment
# setting, so the app and `smsops run` in a browser test follow it too). Tests of the Russian
# screens set SMSOPS_LANGUAGE=ru themselves.
os.environ.setdefault("SMSOPS_LANGUAGE", "en")
# A page waits this long for its background work (smsops.jobs) before it shows progress instead:
# long here, so that a page test reads the result in the run it checks (tests/test_jobs.py and the
# page bench use the deployment's default)
os.environ.setdefault("SMSOPS_JOB_WAIT", "60")

DEMO_CONTACTS = 3_000
DEMO_SEED = 7


def today() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


@pytest.fixture(autouse=True)
def _deployment_language():
    """Each test starts and ends speaking the deployment's language: a page test that switched
    its thread to Russian must not leave the next test reading Russian labels."""
    i18n.clear()
    yield
    i18n.clear()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty SMSOPS_HOME of this test's own."""
    monkeypatch.setenv("SMSOPS_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def built_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo base, built by dbt and published: read-only for the tests that use it."""
    path = tmp_path_factory.mktemp("built")
    demo.generate(DEMO_CONTACTS, DEMO_SEED, as_of=today(), home=path)
    warehouse.build(path)
    return path


@pytest.fixture
def built_env(built_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The session's built warehouse, made the current SMSOPS_HOME."""
    monkeypatch.setenv("SMSOPS_HOME", str(built_home))
    return built_home
