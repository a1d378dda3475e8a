"""The `sagemaker_invoke` pipeline: one `invoke_endpoint` on the sandbox's endpoint with a
payload (inline JSON or a file), judged on the model's status, content and JSON fields; its
latency is always an output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlci_dagster.common.redact import Redactor
from mlci_dagster.common.summary import summarize
from mlci_dagster.common.templating import TemplateError, render
from mlci_dagster.providers.aws.client import READ_TIMEOUT, SageMakerClient, SageMakerError
from mlci_dagster.providers.aws.diagnose import judge
from mlci_dagster.providers.base import PipelineResult
from mlci_dagster.providers.handle import SandboxHandle
from mlci_dagster.registry.aws import SageMakerInvokePipeline
from mlci_dagster.vocabulary import FailureKind

SUMMARY_CHARS = 2000
LOGGED_BODY_CHARS = 4000


def payload_bytes(pipeline: SageMakerInvokePipeline, context: dict[str, Any],
                  root: Path | None) -> bytes:
    """The request body: the file as is, a string as is, any other JSON serialized; inline
    payloads are templated. Raises ValueError naming what is wrong."""
    if pipeline.payload_file is not None:
        if root is None:
            raise ValueError(f"payload_file '{pipeline.payload_file}': the registry root is "
                             "unknown, so the file cannot be found")
        path = root / pipeline.payload_file
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ValueError(f"payload_file '{pipeline.payload_file}': cannot be read under "
                             f"the registry root {root}: {exc.strerror or exc}") from exc
    payload = render(pipeline.payload, context)
    return payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()


def invoke(handle: SandboxHandle, pipeline: SageMakerInvokePipeline, context: dict[str, Any],
           timeout_s: float, *, connect: Callable[[float], SageMakerClient], root: Path | None,
           redactor: Redactor) -> PipelineResult:
    """Sends the payload once and judges the answer: a wrong status, content or field is a
    product failure; a call that fails (no endpoint, no credentials) is infra; no answer
    within the timeout is a timeout."""
    log_path = Path(handle.log_dir) / f"pipeline-{pipeline.name}.log"
    start = time.monotonic()
    transcript: list[str] = []

    def finish(passed: bool, kind: FailureKind | None = None, summary: str = "",
               **extra: Any) -> PipelineResult:
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text(redactor.text("\n".join(transcript) + "\n"))
        except OSError as exc:
            summary += f"\n(log not written: {exc})"
        return PipelineResult(pipeline.name, pipeline.kind, passed, time.monotonic() - start,
                              kind, summarize(redactor.text(summary), SUMMARY_CHARS),
                              str(log_path), **extra)

    endpoint = handle.state.get("endpoint_name", handle.sandbox_id)
    try:
        body = payload_bytes(pipeline, context, root)
        contains = render(pipeline.contains, context)
        json_equals = render(pipeline.json_equals, context)
    except (ValueError, TemplateError) as exc:  # its payload file or references
        return finish(False, FailureKind.CONFIG, str(exc))
    transcript.append(f"InvokeEndpoint {endpoint} ({pipeline.content_type}, {len(body)} "
                      f"bytes): {body[:LOGGED_BODY_CHARS].decode(errors='replace')}")
    try:
        answer = connect(timeout_s).invoke(endpoint, body, pipeline.content_type,
                                           pipeline.accept)
    except SageMakerError as exc:
        transcript.append(f"-> {exc}")
        if exc.code == READ_TIMEOUT:
            return finish(False, FailureKind.TIMEOUT,
                          f"no answer from endpoint {endpoint} within {timeout_s:g}s: {exc}")
        return finish(False, FailureKind.INFRA, f"endpoint {endpoint} could not be invoked: "
                                                f"{exc}")
    text = answer.body.decode(errors="replace")
    transcript.append(f"-> status {answer.status} in {answer.latency_ms:.1f} ms "
                      f"({answer.content_type or 'no content type'}"
                      + (f", variant {answer.variant}" if answer.variant else "")
                      + (f", {answer.error}" if answer.error else "")
                      + f"): {text[:LOGGED_BODY_CHARS]}")
    problems, outputs = judge(answer.status, text, expect_status=pipeline.expect_status,
                              contains=contains, json_equals=json_equals,
                              outputs=pipeline.outputs)
    outputs["latency_ms"] = round(answer.latency_ms, 3)
    details = {"endpoint": endpoint, "status": answer.status,
               "latency_ms": outputs["latency_ms"], "variant": answer.variant}
    if problems:
        return finish(False, FailureKind.PRODUCT,
                      f"endpoint {endpoint}: {'; '.join(problems)}\nresponse: {text[:1000]}",
                      outputs=outputs, details=details)
    return finish(True, outputs=outputs, details=details)
