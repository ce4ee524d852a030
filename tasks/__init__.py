"""Prefect tasks grouped by the system they act on. Each is an idempotent "ensure"."""
