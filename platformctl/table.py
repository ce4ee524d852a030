"""Plain aligned tables, the way a terminal user reads them."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    cells = [[str(column) for column in columns]]
    for row in rows:
        cells.append(["" if row.get(c) is None else _cell(row.get(c)) for c in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(value.ljust(widths[i]) for i, value in enumerate(line)).rstrip()
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    return str(value)
