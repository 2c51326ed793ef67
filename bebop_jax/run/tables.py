"""Aligned plain-text summary tables (`print_table(rows, columns, title)`)."""

from __future__ import annotations

import sys
from typing import IO, Any, Mapping, Sequence

import numpy as np


def _cell(value: Any, float_format: str) -> tuple[str, bool]:
    """(text, is_number): numbers are right-aligned, everything else left-aligned."""
    if value is None:
        return "-", False
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)), False
    if isinstance(value, (float, np.floating)):
        return float_format.format(float(value)), True
    if isinstance(value, (int, np.integer)):
        return str(int(value)), True
    return str(value), False


def format_table(
    rows: Sequence[Mapping[str, Any] | Sequence[Any]],
    columns: Sequence[str],
    title: str | None = None,
    *,
    float_format: str = "{:.4g}",
) -> str:
    """Aligned plain-text table. Rows are mappings (by column name; missing -> '-') or
    sequences (by position, one value per column)."""
    if not columns:
        raise ValueError("columns must name at least one column")
    cells: list[list[tuple[str, bool]]] = []
    for i, row in enumerate(rows):
        if isinstance(row, Mapping):
            values = [row.get(c) for c in columns]
        else:
            values = list(row)
            if len(values) != len(columns):
                raise ValueError(
                    f"rows[{i}] has {len(values)} values for {len(columns)} columns"
                )
        cells.append([_cell(v, float_format) for v in values])
    widths = [len(c) for c in columns]
    for row_cells in cells:
        widths = [max(w, len(text)) for w, (text, _) in zip(widths, row_cells)]
    header = "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()
    rule = "  ".join("-" * w for w in widths)
    lines = [title] if title else []
    lines += [header, rule]
    for row_cells in cells:
        lines.append(
            "  ".join(
                (text.rjust(w) if is_num else text.ljust(w))
                for (text, is_num), w in zip(row_cells, widths)
            ).rstrip()
        )
    return "\n".join(lines)


def print_table(
    rows: Sequence[Mapping[str, Any] | Sequence[Any]],
    columns: Sequence[str],
    title: str | None = None,
    *,
    file: IO[str] | None = None,
    float_format: str = "{:.4g}",
) -> str:
    """Prints `format_table(...)` to `file` (default stdout) and returns the text."""
    text = format_table(rows, columns, title, float_format=float_format)
    print(text, file=sys.stdout if file is None else file, flush=True)
    return text
