"""A ui_smoke route of kind `browser`: the page loaded in headless Chromium (Debian's, driven by
Playwright; nothing downloaded), waited on until the app's JavaScript renders what the route
names, its texts checked, its console errors collected, its load time measured and a screenshot
kept. A single-page app answers 200 with the same shell everywhere: only this shows it renders.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from mlci_dagster.common.chromium import INSTALL_HINT, find_chromium, launch_args
from mlci_dagster.common.templating import render
from mlci_dagster.registry.models import BrowserRoute
from mlci_dagster.stages.details import RouteResult

VIEWPORT = {"width": 1280, "height": 800}
LAUNCH_TIMEOUT_MS = 30_000


def waited_for(route: BrowserRoute, context: dict[str, Any]) -> str:
    wait = route.wait_for
    return (f"selector {render(wait.selector, context)!r}" if wait.selector
            else f"text {render(wait.text or '', context)!r}")


def console_line(message: Any) -> str:
    """A console error with where it came from (a failed resource names no URL otherwise)."""
    where = (message.location or {}).get("url")
    return f"console.error: {message.text}" + (f" ({where})" if where else "")


def credentials_of(http: requests.Session, url: str) -> dict[str, Any]:
    """What the provider's session sends to reach `url` (a service proxy's Authorization
    header, a client certificate), as the browser context's options; nothing for a session
    that adds nothing."""
    prepared = http.prepare_request(requests.Request("GET", url))
    plain = requests.utils.default_headers()
    options: dict[str, Any] = {"extra_http_headers": {
        k: v for k, v in prepared.headers.items() if plain.get(k) != v}}
    if http.cert:
        cert, key = http.cert if isinstance(http.cert, tuple) else (http.cert, None)
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
        options["client_certificates"] = [{"origin": origin, "certPath": cert,
                                           **({"keyPath": key} if key else {})}]
    return options


def check_page(route: BrowserRoute, base_url: str, context: dict[str, Any], *,
               http: requests.Session, env: dict[str, str], screenshot: Path
               ) -> RouteResult:
    """One page in the browser: what was asked, what came back, and every expectation it
    missed (`problems`, the product's) or what kept it from being checked (`infra`). The
    browser reaches the page as `http` (the provider's session) would; `env` marks its
    processes as the sandbox's, so destroy reaps any left behind."""
    url = base_url + render(route.path, context)
    result = RouteResult(url, kind="browser")
    executable = find_chromium()
    if executable is None:
        result.infra.append(f"no Chromium on this machine: {INSTALL_HINT}")
        return result
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    console: list[str] = []
    deadline = time.monotonic() + route.timeout_s
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=executable, args=launch_args(), env={**os.environ, **env},
                timeout=LAUNCH_TIMEOUT_MS)
            try:
                page = browser.new_page(viewport=VIEWPORT, ignore_https_errors=True,
                                        **credentials_of(http, url))
                page.on("console", lambda m: console.append(console_line(m))
                        if m.type == "error" else None)
                page.on("pageerror", lambda error: console.append(
                    f"uncaught: {error.name or 'Error'}: {error.message}"))
                try:
                    _load_and_check(page, route, url, context, deadline, result)
                except PlaywrightTimeout:
                    result.problems.append(
                        f"{waited_for(route, context)} not rendered within "
                        f"{route.timeout_s:g}s")
                except PlaywrightError as exc:  # the page could not be loaded
                    result.problems.append(f"GET {url}: {str(exc).splitlines()[0]}")
                # What the page showed, rendered or not: the first thing to look at.
                page.screenshot(path=str(screenshot), type="jpeg", quality=70)
                result.screenshot = str(screenshot)
            finally:
                browser.close()
    except PlaywrightError as exc:
        result.infra.append(f"Chromium ({executable}): {str(exc).splitlines()[0]}")
    allowed = [re.compile(pattern) for pattern in route.allow_console]
    result.console_errors = console
    result.problems += [f"{message}" for message in console
                           if not any(p.search(message) for p in allowed)]
    return result


def _load_and_check(page: Any, route: BrowserRoute, url: str, context: dict[str, Any],
                    deadline: float, result: RouteResult) -> None:
    start = time.monotonic()

    def left_ms() -> float:
        return max(1.0, (deadline - time.monotonic()) * 1000)

    response = page.goto(url, wait_until="load", timeout=left_ms())
    result.status = response.status if response is not None else None
    if result.status is not None and result.status >= 400:
        result.problems.append(f"status {result.status}")
    wait = route.wait_for
    if wait.selector:
        page.wait_for_selector(render(wait.selector, context), state="visible",
                               timeout=left_ms())
    else:
        page.get_by_text(render(wait.text or "", context)).first.wait_for(
            state="visible", timeout=left_ms())
    # The load time a person waits: from the request to the app's content on screen.
    result.latency_ms = round((time.monotonic() - start) * 1000, 1)
    shown = page.inner_text("body")
    result.problems += [f"page does not show {text!r}"
                           for text in render(route.contains, context) if text not in shown]
