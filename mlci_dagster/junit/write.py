"""JUnit XML written: test cases as CI systems render them (GitHub Actions, Buildkite, GitLab),
a `<testsuite>` per suite, each case with its `<failure>`, `<error>` or `<skipped>`. The
standard library's ElementTree escapes every name and message: a test name is data."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from xml.etree.ElementTree import Element, ElementTree, SubElement

from mlci_dagster.junit.read import TestCase, TestStatus

CHILD = {TestStatus.FAIL: "failure", TestStatus.ERROR: "error", TestStatus.SKIP: "skipped"}
# What XML 1.0 cannot hold even escaped (a log's ANSI colours, NUL): replaced, never written.
NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    return NOT_XML.sub("\ufffd", text)


def suite_element(name: str, cases: Iterable[TestCase], **attributes: str) -> Element:
    suite = Element("testsuite", name=xml_text(name), **attributes)
    counts = dict.fromkeys(TestStatus, 0)
    seconds = 0.0
    for case in cases:
        counts[case.status] += 1
        seconds += case.duration_s
        element = SubElement(suite, "testcase", classname=xml_text(case.classname),
                             name=xml_text(case.name), time=f"{case.duration_s:.3f}")
        if case.status in CHILD:
            SubElement(element, CHILD[case.status], message=xml_text(case.message))
        if case.flaky:  # as Surefire says it: failed, then passed on a rerun
            SubElement(element, "flakyFailure")
    suite.set("tests", str(sum(counts.values())))
    suite.set("failures", str(counts[TestStatus.FAIL]))
    suite.set("errors", str(counts[TestStatus.ERROR]))
    suite.set("skipped", str(counts[TestStatus.SKIP]))
    suite.set("time", f"{seconds:.3f}")
    return suite


def write_junit(path: Path, suites: Iterable[Element], name: str = "") -> Path:
    """Writes `<testsuites>` holding `suites` at `path`, atomically; returns the path."""
    root = Element("testsuites", name=xml_text(name)) if name else Element("testsuites")
    root.extend(suites)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    tmp.replace(path)
    return path


def by_suite(cases: Iterable[TestCase]) -> dict[str, list[TestCase]]:
    """Cases grouped by their suite, in the order first seen."""
    suites: dict[str, list[TestCase]] = {}
    for case in cases:
        suites.setdefault(case.suite, []).append(case)
    return suites
