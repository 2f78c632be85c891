"""What the benchmarks on the 1M demo base share: a private copy of that home."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from smsops import warehouse

BIG_HOME = Path(os.environ.get("SMSOPS_BENCH_HOME", "/tmp/big"))
"""A built 1M demo home: `SMSOPS_HOME=/tmp/big smsops demo --contacts 1000000 && SMSOPS_HOME=/tmp/big smsops build`."""


def copy_big_home(target: Path, *, snapshot: bool) -> Path:
    """Copy the big home's operational store into ``target`` (a fresh folder), and either its
    published snapshot too (``snapshot=True``: the copy builds on its own file) or only the
    pointer to it (the copy reads the big home's snapshot). Skips the test without a built home."""
    published = warehouse.current(BIG_HOME)
    if published is None or not published.path.exists():
        pytest.skip(
            f"no built warehouse at {BIG_HOME}: run `SMSOPS_HOME={BIG_HOME} smsops demo --contacts 1000000`"
            f" and `SMSOPS_HOME={BIG_HOME} smsops build`, or set SMSOPS_BENCH_HOME"
        )
    (target / "warehouse").mkdir(parents=True)
    started = time.perf_counter()
    source, copy = sqlite3.connect(BIG_HOME / "ops.sqlite"), sqlite3.connect(target / "ops.sqlite")
    source.backup(copy)
    source.close()
    copy.close()
    pointer = (BIG_HOME / "warehouse" / "current.json").read_text()
    if snapshot:
        own = target / "warehouse" / published.path.name
        shutil.copyfile(published.path, own)
        pointer = pointer.replace(str(published.path), str(own))
    (target / "warehouse" / "current.json").write_text(pointer)
    # the copy leaves gigabytes of dirty pages for the kernel to write back: flush them now, or
    # the benchmark measures that write-back competing with it (a store in use has none pending)
    os.sync()
    what = "the operational store and the snapshot" if snapshot else "the operational store"
    print(f"\ncopied {what} in {time.perf_counter() - started:.1f} s")
    return target
