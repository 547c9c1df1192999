"""Server-sent events as benchmark clients meet them: the data of each event.

A `data: x` line starts or extends an event's data (several data lines join with "\\n", as SSE says);
shortfin writes `data(<rid>): x` and the raw token text after it, newlines included, so a line that is
no SSE field continues the data; a blank line ends the event; comments (`:`) and the `event`, `id` and
`retry` fields are skipped."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

DATA = re.compile(r"data(?:\([^)]*\))?:[ ]?")
OTHER_FIELD = re.compile(r"(?:event|id|retry):")


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    parts: list[str] | None = None
    async for line in lines:
        if not line:
            if parts is not None:
                yield "\n".join(parts)
                parts = None
            continue
        m = DATA.match(line)
        if m:
            parts = (parts or []) + [line[m.end() :]]
        elif line.startswith(":") or OTHER_FIELD.match(line):
            continue
        elif parts is not None:
            parts.append(line)
    if parts is not None:
        yield "\n".join(parts)
