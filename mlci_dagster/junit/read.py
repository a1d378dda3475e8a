"""JUnit XML read as CI systems read it (pytest, Maven Surefire / JUnit 5, gotestsum,
ScalaTest): one TestCase per `<testcase>`, streamed, so a report of 100,000 cases or a 50 MB
message stays in bounded memory.

The XML goes through defusedxml: a DOCTYPE (billion laughs, external entities) is refused, not
expanded. What cannot be read is a ReportProblem naming the file and what is wrong; the cases
read before a truncation are kept.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import iterparse

from mlci_dagster.common.redact import NO_SECRETS, Redactor
from mlci_dagster.history.signature import signature_of

MAX_MESSAGE_CHARS = 500
# A name longer than this is cut (with a marker): it is a key in tables and pages.
MAX_NAME_CHARS = 1000
# The elements that say how a testcase went, as JUnit's producers write them.
FAILED, ERRORED, SKIPPED = "failure", "error", "skipped"
FLAKY = ("flakyFailure", "flakyError")  # Surefire: failed, then passed on a rerun


class TestStatus(enum.StrEnum):
    __test__ = False  # a name pytest would otherwise collect

    PASS = "pass"
    FAIL = "fail"  # an assertion failed
    ERROR = "error"  # it crashed, or its setup did
    SKIP = "skip"


@dataclass(frozen=True)
class TestCase:
    """One test case: `suite`, `classname` and `name` as the report gives them (a
    parametrized name whole), how it went, and why when it did not pass: a redacted message
    of at most MAX_MESSAGE_CHARS and its failure signature."""

    __test__ = False

    suite: str
    classname: str
    name: str
    status: TestStatus
    duration_s: float
    message: str = ""
    signature: str = ""  # the failure signature's id ("" when it passed or was skipped)
    flaky: bool = False  # the producer reran it: it failed, then passed

    @property
    def id(self) -> str:
        """Stable across runs: suite, class and name, each as given."""
        return " :: ".join((self.suite, self.classname, self.name))

    @property
    def failed(self) -> bool:
        return self.status in (TestStatus.FAIL, TestStatus.ERROR)


@dataclass
class ReportProblem:
    """A report that could not be read, or only in part."""

    path: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}: {self.why}"


@dataclass
class ParsedReport:
    path: str
    cases: list[TestCase] = field(default_factory=list)
    problem: ReportProblem | None = None


CUT = " [...]"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - len(CUT)] + CUT


def _seconds(value: str | None) -> float:
    """`time` in seconds; producers write it as a float, with thousands separators, or not."""
    try:
        return max(0.0, float((value or "0").replace(",", "")))
    except ValueError:
        return 0.0


def _outcome(case: Element) -> tuple[TestStatus, Element | None, bool]:
    status, why, flaky = TestStatus.PASS, None, False
    for child in case:
        tag = child.tag
        if tag in (FAILED, ERRORED):
            if status is not TestStatus.ERROR:  # an error outranks a failure
                status = TestStatus.ERROR if tag == ERRORED else TestStatus.FAIL
                why = child
        elif tag == SKIPPED and status is TestStatus.PASS:
            status, why = TestStatus.SKIP, child
        elif tag in FLAKY:
            flaky = True
    return status, why, flaky


def _message(why: Element | None, redactor: Redactor) -> str:
    """What a failure says: its `type` and `message`, else the first lines of its text."""
    if why is None:
        return ""
    kind, said = why.get("type", ""), why.get("message", "")
    text = said or (why.text or "").strip()
    if kind and not text.startswith(kind):
        text = f"{kind}: {text}" if text else kind
    # Redact before cutting, so no part of a secret survives at the cut.
    return _cut(redactor.text(text[:MAX_MESSAGE_CHARS * 20]), MAX_MESSAGE_CHARS)


def _case(element: Element, suite: str, redactor: Redactor) -> TestCase:
    status, why, flaky = _outcome(element)
    message = _message(why, redactor)
    signature = signature_of("test", str(status), message) if status in (
        TestStatus.FAIL, TestStatus.ERROR) else None
    return TestCase(
        suite=_cut(redactor.text(suite), MAX_NAME_CHARS),
        classname=_cut(redactor.text(element.get("classname", "")), MAX_NAME_CHARS),
        name=_cut(redactor.text(element.get("name", "")), MAX_NAME_CHARS),
        status=status, duration_s=_seconds(element.get("time")), message=message,
        signature=signature.id if signature else "", flaky=flaky)


def iter_cases(path: Path, redactor: Redactor = NO_SECRETS) -> Iterator[TestCase]:
    """Each test case of the report at `path`, as it is read; raises ParseError, OSError or
    DefusedXmlException where the file stops making sense."""
    suites: list[str] = []
    parents: list[Element] = []
    events: Any = iterparse(str(path), events=("start", "end"), forbid_dtd=True)
    for event, element in events:
        if event == "start":
            if element.tag == "testsuite":
                suites.append(element.get("name", ""))
            parents.append(element)
            continue
        parents.pop()
        if element.tag == "testcase":
            yield _case(element, suites[-1] if suites else "", redactor)
            if parents:  # what is read is let go: memory stays bounded
                parents[-1].remove(element)
        elif element.tag == "testsuite":
            suites.pop()
            if parents:
                parents[-1].remove(element)


def read_report(path: Path, redactor: Redactor = NO_SECRETS) -> ParsedReport:
    """Every case of the report, and what kept the rest from being read, if anything did."""
    report = ParsedReport(str(path))
    try:
        if path.stat().st_size == 0:
            report.problem = ReportProblem(str(path), "empty file")
            return report
        for case in iter_cases(path, redactor):
            report.cases.append(case)
    except DefusedXmlException as exc:
        report.problem = ReportProblem(str(path), f"refused: {type(exc).__name__} "
                                       "(a DOCTYPE or entity: JUnit XML has none)")
    except ParseError as exc:
        at = f"line {exc.position[0]}, column {exc.position[1]}"
        report.problem = ReportProblem(
            str(path), f"not well-formed XML at {at}: {str(exc).split(':')[0]}"
            + (f"; {len(report.cases)} test cases read before it" if report.cases else ""))
    except OSError as exc:
        report.problem = ReportProblem(str(path), f"could not be read: {exc.strerror or exc}")
    if report.problem is None and not report.cases and not _is_junit(path):
        report.problem = ReportProblem(str(path), "not JUnit XML (no <testsuites>, "
                                       "<testsuite> or <testcase>)")
    return report


def _is_junit(path: Path) -> bool:
    """Whether the root is a JUnit one (a report with no cases may be a valid empty suite)."""
    try:
        for _, element in iterparse(str(path), events=("start",), forbid_dtd=True):
            return element.tag in ("testsuites", "testsuite")
    except (ParseError, DefusedXmlException, OSError):
        return False
    return False
