"""Sandbox settings the tests share."""

from __future__ import annotations

from smsops.providers.sandbox import SandboxSettings

FAST = SandboxSettings(
    latency=(0.0, 0.0),
    transient_error_rate=0.0,
    duplicate_rate=0.0,
    out_of_order_rate=0.0,
    receipt_delay=(0.01, 0.05),
    rate_per_second=100_000,
)
"""A sandbox without faults or throttling that answers at once and posts receipts within 50 ms."""
