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


# A variable name looks like a credential when one of its words (split on anything but letters
# and digits, any case) is one of these, or ends in one of the first four (PGPASSWORD,
# GHTOKEN). KEY and PASS count only as whole words, so MONKEY or PASSENGER_COUNT do not.
_CREDENTIAL_SUFFIXES = ("PASSWORD", "PASSWD", "SECRET", "TOKEN")
_CREDENTIAL_WORDS = {"KEY", "APIKEY", "PASS"}
# A credential-named variable holding a flag (FEATURE_TOKEN_ENABLED=true) is not masked:
# masking every "true" in a log would shred it.
_FLAG_VALUES = {"true", "false", "yes", "no", "on", "off", "none", "null"}


def looks_like_credential(name: str) -> bool:
    """Whether an environment variable's name says it holds a credential: DB_PASSWORD,
    GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, OPENAI_API_KEY; not MONKEY or TOKENIZERS_PARALLELISM."""
    words = re.split(r"[^A-Z0-9]+", name.upper())
    return any(w in _CREDENTIAL_WORDS or w.endswith(_CREDENTIAL_SUFFIXES) for w in words if w)


def credential_names(environ: Mapping[str, str]) -> list[str]:
    """The variables of `environ` whose names look like credentials and hold more than a flag."""
    return [name for name, value in environ.items()
            if looks_like_credential(name) and value.strip().lower() not in _FLAG_VALUES]


class Redactor:
    """Masks the values of secret variables and well-known credential shapes."""

    def __init__(self, secret_values: Iterable[str] = ()) -> None:
        values = {v for v in secret_values if v and len(v) >= MIN_SECRET_LENGTH}
        # Longest first, so a secret that contains another is masked whole.
        self._values = sorted(values, key=len, reverse=True)

    @classmethod
    def from_env(cls, names: Iterable[str], environ: Mapping[str, str] | None = None) -> Redactor:
        """Masks the values of `names` and of every variable whose name looks like a
        credential, declared or not."""
        env = os.environ if environ is None else environ
        return cls(env.get(name, "") for name in [*names, *credential_names(env)])

    def plus(self, values: Iterable[str]) -> Redactor:
        """This redactor, masking `values` too."""
        return Redactor([*self._values, *values])

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
