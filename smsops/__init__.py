"""smsops: self-hosted SMS campaigns over a dbt-modeled warehouse."""

__version__ = "0.1.0"
