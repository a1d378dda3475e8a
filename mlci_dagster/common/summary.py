"""Bounded text for summaries: what failed is in the first line, why is usually at the end."""

from __future__ import annotations

ERROR_SUMMARY_CHARS = 500  # a stage's error summary
HEAD_CHARS = 160


def summarize(text: str, limit: int = ERROR_SUMMARY_CHARS) -> str:
    """At most `limit` characters: the first line (what failed) and the end (why, usually)."""
    if len(text) <= limit:
        return text
    head = text.split("\n", 1)[0][:HEAD_CHARS]
    return f"{head}\n…\n{text[-(limit - len(head) - 3):]}"
