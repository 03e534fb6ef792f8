"""Terminal output shared by the command-line layers: a console sized for pipes and CI logs, tables."""

from __future__ import annotations

import sys


def console():
    from rich.console import Console

    # pipes and CI logs are not terminals: give tables room instead of rich's default 80 columns
    return Console(highlight=False, width=None if sys.stdout.isatty() else 150)


def rich_table(title: str, columns: list[str], rows: list[list]):
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c in ("tokenizer", "arm", "format", "byte source") else "right")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
