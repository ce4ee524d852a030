"""Template rendering is strict: a missing value is an error, never an empty string."""

from __future__ import annotations

import jinja2
import pytest

from templates import render


def test_missing_value_raises() -> None:
    with pytest.raises(jinja2.UndefinedError):
        render("plan/topology.md.j2", spec={"name": "x"})
