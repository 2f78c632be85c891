"""Helpers for the page tests: open the app (or one of its pages) in Streamlit's AppTest."""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from streamlit.testing.v1 import AppTest

from smsops import segments

APP = Path(__file__).resolve().parent.parent / "app.py"


def open_page(page: str | None = None, timeout: float = 60) -> AppTest:
    """Run the app, switched to ``pages/<page>.py`` when given; fail on an exception."""
    at = AppTest.from_file(str(APP), default_timeout=timeout)
    if page is not None:
        at.switch_page(f"pages/{page}.py")
    at.run()
    assert not at.exception, at.exception
    return at


def open_in_app(page: str, timeout: float = 60) -> AppTest:
    """The app, then ``pages/<page>.py`` in it; fail on an exception. Unlike :func:`open_page`,
    app.py runs first, so the page speaks the language app.py set (``SMSOPS_LANGUAGE``) and its
    sidebar is there, as in a browser."""
    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.run()
    at.switch_page(f"pages/{page}.py")
    at.run()
    assert not at.exception, at.exception
    return at


def metric_values(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def clear_caches() -> None:
    """What a fresh server would have: no cached data, no pooled warehouse connections."""
    st.cache_data.clear()
    st.cache_resource.clear()
    segments.close_connections()
