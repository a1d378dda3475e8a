"""An optional root-cause analyzer behind one small interface: given a new failure signature's
evidence (the signature, its partitions, redacted log tails, and what changed between the last
pass and the first failure: image digest, config id, code version), it returns a short
hypothesis, which is always shown labelled as machine-generated.

The one implementation speaks the OpenAI-compatible chat completions API (OpenAI, vLLM, Ollama,
llama.cpp's server, a gateway): URL, model and key from the environment, off unless set. What
is sent is built from redacted text and redacted once more as a whole, so no value of a secret
variable (the key included) leaves the machine in a request body.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from mlci_dagster.common.redact import Redactor
from mlci_dagster.notify.transport import NotifyError, request_json

SYSTEM_PROMPT = (
    "You triage failures of an end-to-end test harness for ML platforms. Given one failure "
    "signature, the partitions (config|engine) failing with it, redacted log tails and what "
    "changed between the last passing run and the first failing one, answer in at most three "
    "sentences: the most likely cause, and the one thing to check first. Say when the evidence "
    "is too thin to tell.")
MAX_HYPOTHESIS_CHARS = 1200


@dataclass
class Evidence:
    signature: str
    text: str
    partitions: list[str]
    error_summary: str
    log_tails: dict[str, str] = field(default_factory=dict)  # partition -> its log's tail
    changes: dict[str, Any] = field(default_factory=dict)  # last pass vs first failure

    def to_prompt(self) -> str:
        return json.dumps(asdict(self), indent=1)


class RootCauseAnalyzer(Protocol):
    name: str

    def hypothesis(self, evidence: Evidence) -> str:
        """A short hypothesis; NotifyError when the analyzer cannot answer."""
        ...


@dataclass
class ChatCompletionsAnalyzer:
    """POST {url}/chat/completions with {model, messages}; the key as a bearer token."""

    url: str
    model: str
    key: str
    redactor: Redactor
    timeout_s: float = 60.0

    @property
    def name(self) -> str:
        return f"{self.model} at {self.url}"

    def hypothesis(self, evidence: Evidence) -> str:
        redact = self.redactor.plus([self.key])
        body = {"model": self.model, "temperature": 0, "max_tokens": 300, "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": redact.text(evidence.to_prompt())}]}
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        response = request_json("POST", f"{self.url.rstrip('/')}/chat/completions",
                                what="root-cause analyzer", headers=headers, body=body,
                                redactor=redact, timeout_s=self.timeout_s)
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise NotifyError(f"root-cause analyzer: unexpected answer from {self.url}: "
                              f"{type(exc).__name__}: {exc}") from exc
        return redact.text(str(content).strip())[:MAX_HYPOTHESIS_CHARS]
