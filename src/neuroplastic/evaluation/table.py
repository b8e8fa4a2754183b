"""Plain-text tables, as ``neuroplastic`` prints them (Markdown pipe tables)."""

from __future__ import annotations

__all__ = ["format_table"]


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """``header`` and ``rows`` as a Markdown table, every column padded to its widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])
