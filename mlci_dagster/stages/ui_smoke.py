"""The ui_smoke stage: HTTP routes checked for status, content and JSON fields, and pages
rendered in a browser (stages/browser.py), each with its latency."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests

from mlci_dagster.common.dotted import dig
from mlci_dagster.common.templating import TemplateError, render
from mlci_dagster.providers.host import SANDBOX_ID_ENV
from mlci_dagster.registry.models import BrowserRoute, RouteCheck
from mlci_dagster.stages.browser import check_page
from mlci_dagster.stages.context import LifecycleContext
from mlci_dagster.stages.details import (
    ImageDetails,
    PipelineRunsDetails,
    RouteResult,
    SandboxDetails,
    UiSmokeDetails,
)
from mlci_dagster.stages.outcome import StageClock, StageOutcome, skipped
from mlci_dagster.vocabulary import FailureKind, Stage


def check_route(route: RouteCheck, base_url: str, context: dict[str, Any],
                http: requests.Session) -> RouteResult:
    """One route: what was asked, what came back, and every expectation it missed."""
    url = base_url + render(route.path, context)
    problems: list[str] = []
    start = time.monotonic()
    try:
        response = http.get(url, timeout=route.timeout_s)
    except requests.RequestException as exc:
        return RouteResult(url, problems=[f"GET {url}: {type(exc).__name__}: {exc}"])
    latency_ms = round((time.monotonic() - start) * 1000, 1)
    if response.status_code != route.expect_status:
        problems.append(f"status {response.status_code}, expected {route.expect_status}")
    for text in render(route.contains, context):
        if text not in response.text:
            problems.append(f"body lacks {text!r}")
    if route.json_equals:
        try:
            body = response.json()
        except ValueError:
            body = None
            problems.append("body is not JSON")
        for path, expected in render(route.json_equals, context).items():
            if body is None:
                break
            actual = dig(body, path, None)
            if actual != expected:
                problems.append(f"{path} = {actual!r}, expected {expected!r}")
    return RouteResult(url, status=response.status_code, latency_ms=latency_ms,
                       problems=problems)


def smoke_test_ui(
    ctx: LifecycleContext, image: StageOutcome[ImageDetails],
    sandbox: StageOutcome[SandboxDetails], pipelines: StageOutcome[PipelineRunsDetails],
) -> StageOutcome[UiSmokeDetails]:
    handle = sandbox.details.handle
    if handle is None or not (sandbox.passed and pipelines.passed):
        return skipped(Stage.UI_SMOKE, "sandbox or pipeline_runs did not pass")
    clock = StageClock(Stage.UI_SMOKE, ctx.redactor)
    context = ctx.render_context(handle, image.details.attributes(),
                                 outputs=pipelines.details.outputs)
    deadline = time.monotonic() + ctx.config.timeouts.ui_smoke_s
    checks: list[RouteResult] = []
    failures: list[str] = []
    broken: list[str] = []
    http = ctx.provider.http(handle)
    for i, route in enumerate(ctx.config.ui_smoke.routes):
        if time.monotonic() > deadline:
            return clock.failed(FailureKind.TIMEOUT,
                                f"ui_smoke exceeded {ctx.config.timeouts.ui_smoke_s:g}s "
                                f"before routes[{i}]", details=UiSmokeDetails(routes=checks))
        base = handle.endpoints[route.service]
        try:
            check = check_page(
                route, base, context, http=http, env={SANDBOX_ID_ENV: handle.sandbox_id},
                screenshot=Path(handle.log_dir) / f"ui_smoke-{i}.jpg",
            ) if isinstance(route, BrowserRoute) else check_route(route, base, context, http)
        except TemplateError as exc:
            return clock.failed(FailureKind.CONFIG, f"routes[{i}]: {exc}",
                                details=UiSmokeDetails(routes=checks))
        if isinstance(route, BrowserRoute):
            check.screenshot_travels = (route.upload_screenshot
                                        and ctx.registry.settings.artifacts.screenshots)
        checks.append(check)
        failures += [f"{check.url}: {problem}" for problem in check.problems]
        broken += [f"{check.url}: {problem}" for problem in check.infra]
    log_path = Path(handle.log_dir) / "ui_smoke.log"
    log_path.write_text(ctx.redactor.text("\n".join(
        f"{c.url} -> {c.status} in {c.latency_ms} ms "
        f"{[*c.problems, *c.infra] or 'ok'}" for c in checks)))
    if failures or broken:
        # A product that fails its checks outranks a browser that could not check the rest.
        return clock.failed(FailureKind.PRODUCT if failures else FailureKind.INFRA,
                            "\n".join([*failures, *broken]), log_ref=str(log_path),
                            details=UiSmokeDetails(routes=checks))
    return clock.passed(UiSmokeDetails(routes=checks), log_ref=str(log_path))
