"""Failure signatures, a table of cases: what varies between two occurrences of one cause
(numbers, ids, paths, ports, times) never splits them, and different causes never merge."""

from __future__ import annotations

import pytest

from mlci_dagster.history.signature import first_error_line, normalize, signature_of

TRACEBACK = """pipeline train: exit code 1, expected 0
--- stderr
Traceback (most recent call last):
  File "/srv/{run}/train.py", line 12, in <module>
    raise ValueError(f"accuracy {{acc}} below 0.9")
ValueError: accuracy 0.{acc} below 0.9"""


@pytest.mark.parametrize(
    ("one", "other"),
    [
        # The same ValueError in two partitions, other numbers and paths.
        (("pipeline_runs", "product", TRACEBACK.format(run="a1b2c3d4e5f6", acc=71)),
         ("pipeline_runs", "product", TRACEBACK.format(run="0f9e8d7c6b5a", acc=64))),
        # A readiness timeout on other ports, probe counts and durations.
        (("sandbox", "timeout", "service 'mlflow' not ready in time after 300 probes (150.2s):"
          " HTTPConnectionPool(host='127.0.0.1', port=41234): Max retries exceeded"),
         ("sandbox", "timeout", "service 'mlflow' not ready in time after 299 probes (149.9s):"
          " HTTPConnectionPool(host='127.0.0.1', port=39911): Max retries exceeded")),
        # A browser check on other sandboxes' URLs.
        (("ui_smoke", "product", "http://127.0.0.1:56127/: uncaught: TypeError: Cannot read "
          "properties of undefined (reading 'map')"),
         ("ui_smoke", "product", "http://127.0.0.1:40001/: uncaught: TypeError: Cannot read "
          "properties of undefined (reading 'map')")),
        # Timestamps, UUIDs and hex ids.
        (("teardown", "infra", "namespace 3f2c1a7e-9b8d-4c6e-a1f2-0123456789ab stuck "
          "Terminating since 2026-11-25T12:05:03Z (finalizer 0x7f3a)"),
         ("teardown", "infra", "namespace 00000000-1111-4222-8333-444444444444 stuck "
          "Terminating since 2026-12-01 02:00:00+00:00 (finalizer 0x1b)")),
    ],
)
def test_one_cause_is_one_signature_whatever_varies(one, other):
    first, second = signature_of(*one), signature_of(*other)

    assert first == second
    assert first.id == second.id and len(first.id) == 12


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("pipeline_runs", "product", "ValueError: bad input"),
         ("pipeline_runs", "product", "KeyError: bad input")),  # another exception
        (("pipeline_runs", "product", "ValueError: bad input"),
         ("ui_smoke", "product", "ValueError: bad input")),  # another stage
        (("pipeline_runs", "product", "job FAILED: out of memory"),
         ("pipeline_runs", "infra", "job FAILED: out of memory")),  # another kind
        (("pipeline_runs", "product", "train: body lacks 'loss'"),
         ("pipeline_runs", "product", "train: body lacks 'accuracy'")),  # another message
    ],
)
def test_different_causes_never_share_a_signature(one, other):
    assert signature_of(*one).id != signature_of(*other).id


@pytest.mark.parametrize(
    ("summary", "line"),
    [
        (TRACEBACK.format(run="x", acc=5), "ValueError: accuracy 0.5 below 0.9"),
        ("--- stdout\nloading data\nstep 3 of 9\nERROR: shard 7 missing\ndone",
         "ERROR: shard 7 missing"),
        ("[... first 2000 bytes cut]\nconnection refused by 10.0.0.7:5432",
         "connection refused by 10.0.0.7:5432"),
        ("pipeline 'train': exited 1, expected 0\n--- stderr\nepoch 3 of 9\n"
         "ValueError: accuracy 0.63 below 0.9", "ValueError: accuracy 0.63 below 0.9"),
        ("http://127.0.0.1:80/: selector 'h1' not rendered\nhttp://127.0.0.1:80/: uncaught: "
         "TypeError: x is undefined", "http://127.0.0.1:80/: uncaught: TypeError: x is undefined"),
        ("just one line", "just one line"),
        ("", ""),
    ],
)
def test_the_first_error_line_is_the_one_that_says_what_went_wrong(summary, line):
    assert first_error_line(summary) == line


def test_normalization_keeps_the_words_and_drops_what_varies():
    assert normalize("GET http://10.1.2.3:8080/api/runs/42 -> 503 after 1.5s in "
                     "/var/lib/mlci/sandboxes/x.e1.1a2b3c4d at 12:01:02") == (
        "GET http://<host>/api/runs/<n> -> <n> after <n>s in <path> at <time>")


def test_a_run_that_did_not_fail_has_no_signature():
    assert signature_of(None, None, "") is None
    assert signature_of("sandbox", "infra", "").text == "sandbox/infra: "
