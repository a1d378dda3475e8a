"""Secret redaction for every error summary, stored log and metadata value the harness writes."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
# Values shorter than this are not treated as secrets: masking "1" or "on" would shred logs.
MIN_SECRET_LENGTH = 4

# Credentials that look the same wherever they appear, whether or not they were declared.
_PATTERNS = [
    re.compile(r"(?i)\b(password|passwd|secret|token|api[_-]?key)(\s*[=:]\s*)(\S+)"),
    re.compile(r"(?i)(authorization:\s*(?:bearer|basic|token)\s+)(\S+)"),
    re.compile(r"(://[^/\s:@]+:)([^@\s/]+)(@)"),
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
]


class Redactor:
    """Masks the values of declared secret variables and well-known credential shapes."""

    def __init__(self, secret_values: Iterable[str] = ()) -> None:
        values = {v for v in secret_values if v and len(v) >= MIN_SECRET_LENGTH}
        # Longest first, so a secret that contains another is masked whole.
        self._values = sorted(values, key=len, reverse=True)

    @classmethod
    def from_env(cls, names: Iterable[str], environ: Mapping[str, str] | None = None) -> Redactor:
        env = os.environ if environ is None else environ
        return cls(env.get(name, "") for name in names)

    def text(self, value: str) -> str:
        for secret in self._values:
            value = value.replace(secret, MASK)
        value = _PATTERNS[0].sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", value)
        value = _PATTERNS[1].sub(lambda m: f"{m.group(1)}{MASK}", value)
        value = _PATTERNS[2].sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", value)
        return _PATTERNS[3].sub(MASK, value)

    def value(self, value: Any) -> Any:
        """Redacts strings anywhere inside nested dicts, lists and tuples."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


NO_SECRETS = Redactor()
