"""Jinja2 templates for every file put on a host or into git, and for the plan's views.

Rendering is pure: a template name and values in, text out. StrictUndefined turns a
missing value into an error instead of an empty string in a live config file.
"""

from __future__ import annotations

from typing import Any

import jinja2

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("templates", "."),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
    # The templates are package files: no need to stat one at every render to see
    # whether it changed (each VM of phase 1 renders its cloud-init).
    auto_reload=False,
)


def render(name: str, **values: Any) -> str:
    """Render ``templates/<name>`` with ``values``; a missing value raises."""
    return _ENV.get_template(name).render(**values)
