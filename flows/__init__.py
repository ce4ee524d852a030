"""Prefect flows: the parent `platform`, one subflow per phase, and the drift check.

Flows orchestrate only (ordering, mapping over hosts, concurrency, artifacts); every call to
an outside system happens in a task.
"""
