"""Failure signatures: what a failure is, as the same cause produces it in any partition, on any
day: its stage, its failure kind, the exception type it names, and its first error line with
whatever varies between occurrences (numbers, hex ids, UUIDs, paths, ports, timestamps, URLs'
hosts) stripped. Deterministic and pure, so failures cluster across the matrix and over time.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# Order matters: the more specific shapes are replaced before the numbers inside them.
NORMALIZERS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement) for pattern, replacement in (
        (r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?", "<time>"),
        (r"\b\d{1,2}:\d{2}:\d{2}(\.\d+)?\b", "<time>"),
        (r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b",
         "<uuid>"),
        (r"\b(https?|wss?)://[^\s'\"/]+", r"\1://<host>"),
        (r"\b(localhost|\d{1,3}(\.\d{1,3}){3}):\d+\b", "<host>:<port>"),
        (r"\b\d{1,3}(\.\d{1,3}){3}\b", "<ip>"),
        (r"(?<![\w.>])(~|\.{1,2})?(/[\w.@%+-]+)+/?", "<path>"),  # not a URL's path
        (r"\b0x[0-9a-fA-F]+\b", "<hex>"),
        (r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{7,}\b", "<hex>"),
        (r"\b(pid|port|line|attempt)s? \d+", r"\1 <n>"),
        (r"\d+(\.\d+)?", "<n>"),
    ))
# The names exceptions go by: Python's and JavaScript's (`ValueError`, `TypeError`,
# `KeyboardInterrupt`, `SystemExit`, `mlflow.exceptions.MlflowException`).
EXCEPTION = re.compile(r"\b((?:[a-z_][\w]*\.)*[A-Z]\w*(?:Error|Exception|Exit|Interrupt|"
                       r"Failure|Timeout|Refused))\b")
RAISED = re.compile(EXCEPTION.pattern + r":")  # an exception with its message: it was raised
ERROR_WORDS = re.compile(r"error|exception|fail|fatal|refused|denied|not found|timed? ?out|"
                         r"crash|panic|killed|cannot|could not|unable|missing|expected|lacks",
                         re.IGNORECASE)
MAX_MESSAGE_CHARS = 160


@dataclass(frozen=True)
class Signature:
    stage: str
    failure_kind: str
    exception: str
    message: str  # the first error line, normalized

    @property
    def text(self) -> str:
        """`ui_smoke/product: TypeError: Cannot read properties of undefined (reading '<q>')`"""
        return f"{self.stage}/{self.failure_kind}: " + ": ".join(
            part for part in (self.exception, self.message) if part)

    @property
    def id(self) -> str:
        """Twelve hex characters, the same for the same text wherever it is computed."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]


def normalize(line: str) -> str:
    for pattern, replacement in NORMALIZERS:
        line = pattern.sub(replacement, line)
    line = re.sub(r"'[^'\s]{24,}'|\"[^\"\s]{24,}\"", "<q>", line)  # long quoted tokens vary too
    return re.sub(r"\s+", " ", line).strip()[:MAX_MESSAGE_CHARS]


def first_error_line(summary: str) -> str:
    """The line of an error summary that says what went wrong: the last exception raised (a
    traceback's final line: `ValueError: ...`), else the first line with an error word, else
    the first line."""
    lines = [line.strip() for line in summary.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("[...")]  # a cut marker
    if not lines:
        return ""
    raised = [line for line in lines if RAISED.search(line)]
    if raised:
        return raised[-1]
    return next((line for line in lines if ERROR_WORDS.search(line)), lines[0])


def exception_of(line: str, summary: str) -> str:
    """The exception type the failure names: in its error line, else anywhere in its summary
    (the last one: a traceback's final exception)."""
    found = EXCEPTION.search(line)
    if found:
        return found.group(1).rsplit(".", 1)[-1]
    named = EXCEPTION.findall(summary)
    return named[-1].rsplit(".", 1)[-1] if named else ""


def signature_of(stage: str | None, failure_kind: str | None, error_summary: str
                 ) -> Signature | None:
    """The failure's signature; None for a run that did not fail."""
    if not stage:
        return None
    line = first_error_line(error_summary)
    exception = exception_of(line, error_summary)
    message = line
    if exception and exception in line:  # "x.y.ValueError: msg" -> "msg"
        message = line.split(exception, 1)[1].lstrip(":").strip() or line
    return Signature(str(stage), str(failure_kind or ""), exception, normalize(message))
