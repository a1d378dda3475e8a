"""The pipeline_runs stage: run each declared pipeline in order, stop at the first failure."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import requests

from mlci_dagster.common.dotted import dig
from mlci_dagster.common.summary import summarize
from mlci_dagster.common.templating import TemplateError, render
from mlci_dagster.history.record import failing_tests_text
from mlci_dagster.providers.base import PipelineResult
from mlci_dagster.providers.handle import SandboxHandle
from mlci_dagster.providers.logpipe import OutputWatcher
from mlci_dagster.registry.base import ReportingPipeline
from mlci_dagster.registry.models import CommandPipeline, SubmitPollPipeline
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.details import (
    ImageDetails,
    PipelineRunsDetails,
    PipelineTests,
    SandboxDetails,
)
from mlci_dagster.stages.outcome import StageClock, StageOutcome, skipped, start_failure_kind
from mlci_dagster.stages.reports import collect_reports
from mlci_dagster.vocabulary import FailureKind, Stage

SUMMARY_CHARS = 2000  # a result's summary: its first line and the output's tail


def run_pipelines(
    ctx: LifecycleContext, image: StageOutcome[ImageDetails],
    sandbox: StageOutcome[SandboxDetails],
) -> StageOutcome[PipelineRunsDetails]:
    handle = sandbox.details.handle
    if not sandbox.passed or handle is None:
        return skipped(Stage.PIPELINE_RUNS, "sandbox did not pass")
    clock = StageClock(Stage.PIPELINE_RUNS, ctx.redactor)
    deadline = time.monotonic() + ctx.config.timeouts.pipeline_runs_s
    outputs: dict[str, dict[str, Any]] = {}
    results: list[PipelineResult] = []
    tests: dict[str, PipelineTests] = {}
    for pipeline in ctx.config.pipelines:
        remaining = deadline - time.monotonic()
        timeout_s = max(0.1, min(pipeline.timeout_s or remaining, remaining))
        context = ctx.render_context(handle, image.details.attributes(), outputs=outputs)
        started = time.monotonic()
        try:
            if isinstance(pipeline, CommandPipeline):
                result = run_command_pipeline(ctx, handle, pipeline, context, timeout_s)
            elif isinstance(pipeline, SubmitPollPipeline):
                result = run_submit_poll_pipeline(ctx, handle, pipeline, context, timeout_s)
            else:  # a kind only the sandbox's provider runs
                result = ctx.provider.run_pipeline(handle, pipeline, context, timeout_s)
        except TemplateError as exc:  # the test's own reference, unresolvable at run time
            result = PipelineResult(pipeline.name, pipeline.kind, False,
                                    time.monotonic() - started, FailureKind.CONFIG, str(exc))
        results.append(result)
        outputs[pipeline.name] = result.outputs
        if isinstance(pipeline, ReportingPipeline) and pipeline.reports:
            tests[pipeline.name] = collect_reports(ctx, handle, pipeline, context)
        if not result.passed:
            assert result.failure_kind is not None
            # Which tests failed leads the first line: what a person (and the signature) reads
            # first, and what a cut summary keeps.
            found = tests.get(pipeline.name)
            named = failing_tests_text(found.failing, found.failing_total, found.counts.total,
                                       limit=1, compact=True) if found else ""
            return clock.failed(
                result.failure_kind, f"pipeline '{pipeline.name}': "
                + (f"{named}; " if named else "") + result.summary,
                log_ref=result.log_ref,
                details=PipelineRunsDetails(pipelines=results, outputs=outputs, tests=tests))
    return clock.passed(PipelineRunsDetails(pipelines=results, outputs=outputs, tests=tests),
                        log_ref=handle.log_dir)


def run_command_pipeline(
    ctx: LifecycleContext, handle: SandboxHandle, pipeline: CommandPipeline,
    context: dict[str, Any], timeout_s: float,
) -> PipelineResult:
    argv, env = render(pipeline.command, context), render(pipeline.env, context)
    # Checked as the output streams by: the whole of it is only in the log.
    watcher = OutputWatcher(render(pipeline.expect_output, context), pipeline.outputs)
    try:
        done = ctx.provider.run_command(handle, pipeline.name, argv, env, timeout_s, watcher)
    except OSError as exc:
        return PipelineResult(pipeline.name, pipeline.kind, False, 0.0, start_failure_kind(exc),
                              f"could not start {argv[0]!r}: {exc.strerror or exc}")

    def failed(kind: FailureKind, why: str) -> PipelineResult:
        tail = done.stderr_tail or done.stdout_tail
        return PipelineResult(pipeline.name, pipeline.kind, False, done.duration_s, kind,
                              summarize(f"{why}\n{tail}", SUMMARY_CHARS), done.log_path,
                              details={"exit_code": done.exit_code})

    if done.timed_out:
        return failed(FailureKind.TIMEOUT, f"killed at its timeout of {timeout_s:g}s")
    if done.exit_code != pipeline.expect_exit_code:
        return failed(FailureKind.PRODUCT,
                      f"exited {done.exit_code}, expected {pipeline.expect_exit_code}")
    if watcher.missing:
        return failed(FailureKind.PRODUCT, f"output lacks {watcher.missing[0]!r}")
    for key, pattern in pipeline.outputs.items():
        if key not in watcher.captured:
            return failed(FailureKind.PRODUCT, f"output '{key}' not found: /{pattern}/")
    return PipelineResult(pipeline.name, pipeline.kind, True, done.duration_s,
                          log_ref=done.log_path,
                          outputs={key: watcher.captured[key] for key in pipeline.outputs},
                          details={"exit_code": done.exit_code})


def run_submit_poll_pipeline(
    ctx: LifecycleContext, handle: SandboxHandle, pipeline: SubmitPollPipeline,
    context: dict[str, Any], timeout_s: float,
) -> PipelineResult:
    """Submit, then poll the status field until success, failure or the timeout."""
    log_path = Path(handle.log_dir) / f"pipeline-{pipeline.name}.log"
    start = time.monotonic()
    deadline = start + timeout_s
    transcript: list[str] = []

    def finish(passed: bool, kind: FailureKind | None = None, summary: str = "",
               **extra: Any) -> PipelineResult:
        log_path.write_text(ctx.redactor.text("\n".join(transcript)))
        # A job's fetched logs can be long: the summary keeps the first line and the tail.
        return PipelineResult(pipeline.name, pipeline.kind, passed, time.monotonic() - start,
                              kind, summarize(summary, SUMMARY_CHARS), str(log_path), **extra)

    submit = render(pipeline.submit.model_dump(by_alias=True), context)
    http = ctx.provider.http(handle)
    try:
        response = http.request(submit["method"], submit["url"], json=submit["json"],
                                    headers=submit["headers"], timeout=30)
        transcript.append(f"{submit['method']} {submit['url']} -> {response.status_code} "
                          f"{response.text[:2000]}")
        response.raise_for_status()
        job_id = str(dig(response.json(), pipeline.id_field))
    except (requests.RequestException, ValueError, KeyError) as exc:
        return finish(False, FailureKind.PRODUCT, f"submit failed: {exc}")
    poll_url = render(pipeline.poll_url, {**context, "id": job_id})
    status, body = None, {}
    while time.monotonic() < deadline:
        try:
            response = http.get(poll_url, timeout=min(30, max(1, deadline - time.monotonic())))
            response.raise_for_status()
            body = response.json()
            status = str(dig(body, pipeline.status_field))
        except (requests.RequestException, ValueError, KeyError) as exc:
            transcript.append(f"GET {poll_url} -> {exc}")
            return finish(False, FailureKind.PRODUCT, f"poll failed: {exc}", outputs={})
        if not transcript[-1].startswith(f"status {status}"):
            transcript.append(f"status {status} at {time.monotonic() - start:.1f}s")
        if status in pipeline.success_states:
            break
        if status in pipeline.failure_states:
            logs = _fetch_logs(http, pipeline, context, job_id)
            transcript.append(f"logs:\n{logs}")
            return finish(False, FailureKind.PRODUCT,
                          f"job {job_id} ended {status}; logs tail:\n{logs}",
                          details={"job_id": job_id, "status": status})
        time.sleep(pipeline.interval_s)
    else:
        return finish(False, FailureKind.TIMEOUT,
                      f"job {job_id} still {status} at the timeout of {timeout_s:g}s",
                      details={"job_id": job_id, "status": status})
    try:
        outputs = {"id": job_id} | {k: dig(body, path) for k, path in pipeline.outputs.items()}
    except KeyError as exc:
        return finish(False, FailureKind.PRODUCT, f"output missing: {exc}")
    return finish(True, outputs=outputs, details={"job_id": job_id, "status": status})


def _fetch_logs(http: requests.Session, pipeline: SubmitPollPipeline, context: dict[str, Any],
                job_id: str) -> str:
    if not pipeline.logs_url:
        return ""
    url = render(pipeline.logs_url, {**context, "id": job_id})
    try:
        response = http.get(url, timeout=10)
        if pipeline.logs_field:
            return str(dig(response.json(), pipeline.logs_field, ""))
        return response.text if response.ok else json.dumps({"status": response.status_code})
    except (requests.RequestException, ValueError) as exc:
        return f"(logs unavailable: {exc})"
