"""What every benchmark prints and saves: a Markdown table on stdout and a JSON file.

print_table(rows, ["name", ("ttft_ms", "TTFT (ms)")])   # rows: dataclasses or dicts
write_json("out.json", result)                          # a dataclass (asdict), or plain data
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

Column = str | tuple[str, str]  # a field name, or (field name, header)


def _value(row: Any, key: str) -> Any:
    if isinstance(row, dict):
        return row.get(key)
    return getattr(row, key, None)


def format_cell(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(rows: Iterable[Any], columns: Sequence[Column], digits: int = 2) -> str:
    """A Markdown table (readable as plain text too): numbers right-aligned, floats with `digits` decimals,
    None as "-"."""
    keys = [c if isinstance(c, str) else c[0] for c in columns]
    headers = [c if isinstance(c, str) else c[1] for c in columns]
    values = [[_value(r, k) for k in keys] for r in rows]
    cells = [[format_cell(v, digits) for v in row] for row in values]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    # a column of numbers (and blanks) is right-aligned, header included; elsewhere numbers are right-aligned too
    numeric = [bool(values) and all(_is_number(row[i]) or row[i] is None for row in values) for i in range(len(keys))]

    def line(texts: list[str], raw: list[Any] | None) -> str:
        return (
            "| "
            + " | ".join(
                t.rjust(w) if numeric[i] or (raw is not None and _is_number(raw[i])) else t.ljust(w)
                for i, (t, w) in enumerate(zip(texts, widths))
            )
            + " |"
        )

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers, None), rule] + [line(c, v) for c, v in zip(cells, values)])


def print_table(
    rows: Iterable[Any],
    columns: Sequence[Column],
    title: str | None = None,
    file: TextIO | None = None,
    digits: int = 2,
) -> None:
    out = file or sys.stdout
    if title:
        print(f"\n{title}\n", file=out)
    print(format_table(rows, columns, digits), file=out)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses (nested too) as dicts; NaN / inf as null (JSON has neither)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """`obj` (a dataclass or plain data) as indented JSON; "-" writes to stdout."""
    text = json.dumps(to_jsonable(obj), indent=2) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
