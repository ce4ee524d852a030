"""The README's sizing table is the one the code uses."""

from __future__ import annotations

from sizing.tiers import tier_table_markdown
from tests.conftest import ROOT


def test_readme_shows_the_current_tier_table() -> None:
    assert tier_table_markdown() in (ROOT / "README.md").read_text()
