"""Terminal output of the commands: rich tables on a terminal, whole plain rows when piped, progress on stderr."""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, Sequence

PIPED_WIDTH = 1000  # a piped line is never cut (rich would cut at 80 columns)


def is_terminal(stream=None) -> bool:
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def console(stderr: bool = False):
    """A rich Console: the terminal's width on a terminal, and on a pipe or file wide lines without colour."""
    from rich.console import Console

    if is_terminal(sys.stderr if stderr else sys.stdout):
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=PIPED_WIDTH, no_color=True, highlight=False, soft_wrap=True)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], title: str | None = None) -> None:
    """Print a table: a rich table on a terminal; piped, a header line and one line per row, columns separated by
    at least two spaces (no cell holds two spaces in a row), nothing cut."""
    rows = [[str(c) for c in r] for r in rows]
    if is_terminal():
        from rich.table import Table

        t = Table(*headers, title=title)
        for r in rows:
            t.add_row(*r)
        console().print(t)
        return
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    out = [] if title is None else [title]
    for r in [list(headers), *rows]:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()


def progress(items: Sequence, description: str, enabled: bool | None = None) -> Iterator:
    """Yield `items`, showing progress on stderr: a bar on a terminal; when piped and asked (`enabled`), a plain
    line at most every 2 s and at the end. `enabled` None: a bar on a terminal for more than one item."""
    n = len(items)
    tty = is_terminal(sys.stderr)
    if enabled is None:
        enabled = tty and n > 1
    if not enabled or n == 0:
        yield from items
        return
    if tty and not os.environ.get("QDSIZE_PLAIN_PROGRESS"):
        from rich.progress import track

        yield from track(items, description=description, console=console(stderr=True), transient=True)
        return
    last = 0.0
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if i == n or now - last >= 2.0:
            sys.stderr.write(f"qdsize: {description} {i}/{n}\n")
            sys.stderr.flush()
            last = now
