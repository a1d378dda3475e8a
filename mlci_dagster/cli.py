"""`mlci`: validate and inspect the registry, sync partitions, run lifecycles, report results."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mlci_dagster import __version__
from mlci_dagster.launch.selection import (
    Selected,
    SelectionError,
    by_filters,
    by_keys,
    by_plan,
    plan_label,
    read_plan,
)
from mlci_dagster.paths import DEFAULT_DAGSTER_HOME, REGISTRY_ENV, registry_path
from mlci_dagster.registry import Registry, RegistryError, load_registry
from mlci_dagster.registry.models import Settings, TestConfig

# An embedded-default instance: SQLite storage under $DAGSTER_HOME (deploy/ holds the others).
DEFAULT_INSTANCE_YAML = "telemetry:\n  enabled: false\n"


class UsageError(Exception):
    """A command line that cannot be acted on: printed as argparse prints its own, exit 2."""


def _registry(args: argparse.Namespace) -> Registry:
    registry = load_registry(args.registry)
    for warning in registry.warnings:
        print(f"mlci: warning: {warning}", file=sys.stderr)
    return registry


def _home(create: bool) -> Path:
    """$DAGSTER_HOME, or ./.dagster_home when it is not set (said once, and set for every
    process mlci starts). A command that only reads the history needs the home to exist."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        home = str(Path.cwd() / DEFAULT_DAGSTER_HOME)
        if not create and not Path(home).is_dir():
            raise SystemExit(
                f"mlci: no history here: DAGSTER_HOME is not set and {home} does not exist; "
                "run `mlci run` in this folder first, or export DAGSTER_HOME=<the folder that "
                "keeps the history> (the demo's is .dagster_home in the project folder)")
        print(f"mlci: DAGSTER_HOME is not set: using {home}", file=sys.stderr)
        os.environ["DAGSTER_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)
    settings = Path(home) / "dagster.yaml"
    if not settings.exists():
        settings.write_text(DEFAULT_INSTANCE_YAML)
    return Path(home)


def _instance(registry: Registry | None = None, create: bool = True):
    """The Dagster instance at $DAGSTER_HOME (see `_home`). With a registry, its pool limits
    are written into the instance's dagster.yaml first."""
    import dagster as dg
    import yaml

    from mlci_dagster.launch.pools import with_pool_limits

    settings = _home(create) / "dagster.yaml"
    if registry is not None:
        current = yaml.safe_load(settings.read_text()) or {}
        wanted = with_pool_limits(current, registry.settings)
        if wanted != current:
            try:
                settings.write_text(yaml.safe_dump(wanted, sort_keys=False))
            except OSError as exc:  # a ConfigMap mounted read-only, as the Helm chart does
                print(f"mlci: {settings}: the registry's pool limits differ from the run "
                      f"queue's and cannot be written ({exc.strerror}); pass `mlci helm-values` "
                      "to helm upgrade -f", file=sys.stderr)
    return dg.DagsterInstance.get()


def _history():
    """The instance, for a command that only reads the history."""
    return _instance(create=False)


def cmd_helm_values(args: argparse.Namespace) -> int:
    import yaml

    from mlci_dagster.launch.pools import helm_values

    print(yaml.safe_dump(helm_values(_registry(args).settings), sort_keys=False), end="")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    registry = _registry(args)
    quarantine = _quarantine(registry)
    print(f"{registry.root}: ok: {len(registry.configs)} configs, {len(registry.engines)} engines, "
          f"{len(registry.partitions())} partitions, {len(quarantine.quarantine)} quarantined")
    return 0


def _quarantine(registry: Registry) -> Any:
    """The registry's quarantine, each entry naming one of its partitions; RegistryError."""
    from mlci_dagster.registry.quarantine import (
        load_quarantine,
        quarantine_path,
        unknown_partitions,
    )

    quarantine = load_quarantine(registry.root)
    problems = unknown_partitions(quarantine, registry.partition_keys(),
                                  quarantine_path(registry.root))
    if problems:
        raise RegistryError(problems)
    return quarantine


def cmd_quarantine(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from mlci_dagster.history.render import table
    from mlci_dagster.registry.quarantine import QuarantineEntry, save_quarantine

    registry = _registry(args)
    quarantine = _quarantine(registry)
    now = time.time()
    if args.action == "list":
        entries = quarantine.quarantine
        if args.json:
            print(json.dumps([e.model_dump(mode="json") | {"active": e.active(now)}
                              for e in entries], indent=2))
        elif entries:
            print(table([["TARGET", "OWNER", "EXPIRES", "STATE", "REASON", "ISSUE"], *(
                [e.target, e.owner, str(e.expires), "active" if e.active(now) else "EXPIRED",
                 e.reason, e.issue or "-"] for e in entries)]))
        else:
            print("nothing quarantined")
        return 0
    if not args.partition:
        raise UsageError(f"quarantine {args.action}: expected a partition (config|engine)")
    same = [e for e in quarantine.quarantine
            if (e.partition, e.test) == (args.partition, args.test)]
    kept = [e for e in quarantine.quarantine if e not in same]
    target = args.partition + (f" :: {args.test}" if args.test else "")
    if args.action == "remove":
        if not same:
            raise UsageError(f"{target}: not quarantined")
        path = save_quarantine(registry.root, quarantine.model_copy(update={"quarantine": kept}))
        print(f"{target}: quarantine lifted ({path})")
        return 0
    if unknown := registry.unknown_key(args.partition):
        raise UsageError(unknown)
    expires = args.expires or (datetime.now(UTC) + timedelta(days=args.days)).date().isoformat()
    try:
        entry = QuarantineEntry(partition=args.partition, test=args.test, owner=args.owner or "",
                                reason=args.reason or "", expires=expires, issue=args.issue)
    except ValidationError as exc:
        raise UsageError("; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                   for e in exc.errors())) from None
    if not entry.active(now):
        raise UsageError(f"--expires: {entry.expires} is not after today (UTC)")
    path = save_quarantine(registry.root, quarantine.model_copy(
        update={"quarantine": [*kept, entry]}))
    print(f"{entry.text()}: {'updated' if same else 'quarantined'} ({path})")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    model = TestConfig if args.kind == "config" else Settings
    print(json.dumps(model.model_json_schema(by_alias=True), indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    rows = [("PARTITION", "TIERS", "CONFIG ID", "FILE")]
    for selected in _selection(registry, args):
        loaded = registry.configs[selected.config]
        rows.append((selected.key, ",".join(loaded.config.tiers), loaded.config_id,
                     str(loaded.path.relative_to(registry.root))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from mlci_dagster.tiers.plan import PlanError, plan_revisions, render_plan

    registry = _registry(args)
    try:
        plan = plan_revisions(registry, args.base, args.head, tier=args.tier, repo=args.repo)
    except PlanError as exc:
        print(f"mlci plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    for note in plan.notes:
        print(f"mlci plan: note: {note}", file=sys.stderr)
    print(render_plan(plan))
    return 0


def cmd_qualified(args: argparse.Namespace) -> int:
    from mlci_dagster.operations import qualified_releases

    with _history() as instance:
        found = qualified_releases(instance, args.limit)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print("no qualified SHA yet: none whose nightly run set fully passed")
    for item in found:
        when = datetime.fromtimestamp(item["qualified_at"], UTC).strftime("%Y-%m-%d %H:%MZ")
        print(f"{item['sha']}  {item['tier']}  {item['partitions']} partitions  {when}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from mlci_dagster.launch.pools import pool_limits
    from mlci_dagster.operations import sync_partitions

    registry = _registry(args)  # raises before any change: nothing is half-registered
    add, remove = sync_partitions(_instance(registry), registry)
    limits = pool_limits(registry.settings)
    print(f"config partitions: {len(registry.configs)} (added: {', '.join(add) or 'none'}; "
          f"removed: {', '.join(remove) or 'none'}); pool limits: "
          f"{', '.join(f'{n}={limit}' for n, limit in limits.items()) or 'none'}")
    return 0


def _selection(registry: Registry, args: argparse.Namespace) -> list[Selected]:
    """The partitions a command's --config/--engine/--tier (or run's --partitions/--plan)
    select, each name checked against the registry; nothing selected is a usage error."""
    try:
        if getattr(args, "plan", None):
            plan = read_plan(args.plan)  # once: it may come from a pipe
            args.batch_label = plan_label(plan)
            selected = by_plan(registry, plan)
        elif getattr(args, "partitions", None):
            selected = by_keys(registry, [k for group in args.partitions
                                          for k in group.split(",") if k])
        else:
            selected = by_filters(registry, args.config, args.engine, args.tier)
    except SelectionError as exc:
        raise UsageError(str(exc)) from exc
    if not selected and not getattr(args, "plan", None):
        raise UsageError(f"no partition matches {selected_by(args) or 'the registry'}")
    return selected


def selected_by(args: argparse.Namespace) -> str:
    return " ".join(f"--{k} {','.join(v)}" for k in ("config", "engine", "tier")
                    if (v := getattr(args, k, None)))


def _keys(registry: Registry, args: argparse.Namespace) -> list[str]:
    return [s.key for s in _selection(registry, args)]


def cmd_run(args: argparse.Namespace) -> int:
    from mlci_dagster.history.render import table
    from mlci_dagster.launch.pools import pool_limits, pool_of
    from mlci_dagster.launch.progress import Progress
    from mlci_dagster.launch.reruns import rerun_of_run
    from mlci_dagster.launch.runner import PartitionRun, Verdict, new_batch, run_partitions
    from mlci_dagster.operations import guard_batch, sync_partitions
    from mlci_dagster.paths import mlci_home
    from mlci_dagster.reservations.leases import holds_by_reservation

    registry = _registry(args)
    selected = _selection(registry, args)
    limits = pool_limits(registry.settings)
    pools = {s.key: pool_of(registry, s.config) for s in selected}
    if args.dry_run:
        return _dry_run(registry, selected, pools, limits, args)
    if not selected:
        print("the plan selects no partition: nothing to run")
        return 0
    instance = _instance(registry)
    sync_partitions(instance, registry)
    resource = _resource(registry)
    refused = guard_batch(instance, resource, [(s.config, s.engine) for s in selected],
                          lambda line: print(f"  {line}", flush=True))
    count = len(selected)
    print(f"running {count} partition{'s' if count != 1 else ''}, "
          f"{min(args.parallel, count)} at a time, on DAGSTER_HOME={os.environ['DAGSTER_HOME']}",
          flush=True)
    home = mlci_home()
    items = [PartitionRun(s.key, str(uuid.uuid4()), pools[s.key]) for s in selected]
    for s, item in zip(selected, items, strict=True):
        reservation = registry.configs[s.config].config.sandbox.reservation
        if reservation in refused:  # held or dirty after the guard: not run in this batch
            item.verdict = Verdict.SKIPPED
            item.why = f"reservation {reservation}: {refused[reservation]}"
    progress = Progress(instance, registry, [item.key for item in items], home)
    events = _RunPrinter(progress, resource, instance)
    for item in items:
        if item.verdict is not None:
            events.finished(item)
    # The longest any lifecycle of a pool may take: a wait for its slot longer than that
    # means something holds it that will not let go.
    longest: dict[str, float] = {}
    for loaded in registry.configs.values():
        pool = pool_of(registry, loaded.name)
        longest[pool] = max(longest.get(pool, 0.0), loaded.config.timeouts.lifecycle_s)
    start = time.monotonic()
    stop_signal = _stop_on_sigterm()
    decided = [item for item in items if item.verdict is not None]
    try:
        ran, stopped = run_partitions(
            instance, registry.root, [item for item in items if item.verdict is None], limits,
            args.parallel, args.trigger, home, events,
            batch=new_batch(label=getattr(args, "batch_label", "")),
            max_wait_s=lambda pool: args.max_wait if args.max_wait is not None
            else longest.get(pool, 0.0),
            fail_fast=args.fail_fast,
            held=lambda: holds_by_reservation(resource.reservations(instance).store),
            reruns=lambda run_id: rerun_of_run(instance, registry, run_id))
    finally:
        progress.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    items = decided + ran  # with the reruns it ran
    seconds = time.monotonic() - start
    if stopped == "interrupted":
        canceled = sum(item.verdict is Verdict.CANCELED for item in items)
        print(f"interrupted after {seconds:.1f}s: {canceled} partition(s) cancelled and torn "
              "down; `mlci report` shows what was recorded", flush=True)
        return 128 + stop_signal[0]
    print(f"done in {seconds:.1f}s" + (f" ({stopped})" if stopped else ""), flush=True)
    grid = update_history(str(registry.root))
    print(f"history updated; grid: {grid}\n")
    _print_report(instance, registry, list(dict.fromkeys(item.key for item in items)),
                  as_json=False)
    not_run = [[item.key, item.why] for item in items if item.verdict is Verdict.NOT_RUN]
    if not_run:
        print(f"\nnot run:\n{table([['PARTITION', 'WHY'], *not_run])}")
    return 1 if any(item.failed for item in items) else 0


def cmd_culprit(args: argparse.Namespace) -> int:
    from mlci_dagster.culprits.search import SearchRefused
    from mlci_dagster.history.render import table
    from mlci_dagster.launch.progress import Progress
    from mlci_dagster.operations import sync_partitions
    from mlci_dagster.paths import mlci_home
    from mlci_dagster.searches import drive, latest_searches, open_search
    from mlci_dagster.vocabulary import split_partition_key

    if args.action == "list":
        with _history() as instance:
            found = list(latest_searches(instance).values())
        if args.json:
            print(json.dumps(found, indent=2))
        else:
            rows = [[f["search"]["id"], f["search"]["partition"], f["state"],
                     str(len(f["reruns"])), f["text"]] for f in found]
            print(table([["SEARCH", "PARTITION", "STATE", "RERUNS", "VERDICT"], *rows])
                  if rows else "no culprit search on record")
        return 0
    if not args.partition:
        raise UsageError("culprit find: expected a partition (config|engine)")
    registry = _registry(args)
    instance = _instance(registry)
    sync_partitions(instance, registry)
    home = mlci_home()
    try:
        search, new = open_search(instance, registry, home, args.partition, driver="cli",
                                  good=args.good, bad=args.bad)
    except SearchRefused as exc:
        print(f"mlci culprit find {args.partition}: not searched: {exc}", file=sys.stderr)
        return 1
    if not new and search.driver != "cli":
        print(f"search {search.id} is already open, run by the culprit_search sensor: "
              "`mlci culprit list` shows it")
        return 0
    print(f"search {search.id}: {len(search.commits)} commits after "
          f"{search.commit_text(search.last_pass)}, up to {search.max_runs} reruns, "
          f"{search.width} at once", flush=True)
    progress = Progress(instance, registry, [search.partition], home)
    try:
        driven = drive(instance, registry, home, search,
                       _RunPrinter(progress, _resource(registry), instance),
                       max_wait_s=args.max_wait or registry.configs[split_partition_key(
                           search.partition)[0]].config.timeouts.lifecycle_s)
    finally:
        progress.close()
    summary = driven.last.summary()
    print(f"{summary['text']} ({len(driven.last.reruns)} reruns in {driven.rounds} rounds)"
          + (f"; stopped: {driven.stopped}" if driven.stopped else ""))
    return 0 if summary["state"] == "confirmed" else 1


class _RunPrinter:
    """`mlci run`'s lines (the runner's RunEvents): the progress display, and a line per
    partition as it ends."""

    def __init__(self, progress: Any, resource: Any, instance: Any) -> None:
        self.progress, self.resource, self.instance = progress, resource, instance

    def started(self, item: Any) -> None:
        self.progress.started(item.key, item.run_id)

    def waiting(self, item: Any, why: str) -> None:
        self.progress.waiting(item.key, why)

    def finished(self, item: Any) -> None:
        ran = item.started > 0
        self.progress.finished(item.key, str(item.verdict),
                               f"{item.seconds:.1f}s" if ran else item.why)
        timing = f" in {item.seconds:.1f}s (run {item.run_id[:8]})" if ran else ""
        print(f"  {item.key}: {item.verdict}{timing}" + (f": {item.why}" if item.why else ""),
              flush=True)

    def lost(self, item: Any) -> None:
        self.resource.reap_run(self.instance, item.run_id)

    def stopping(self, running: list[Any], why: str) -> None:
        if running:
            print(f"{why}: cancelling {len(running)} partition(s) in progress and tearing down "
                  f"their sandboxes: {', '.join(item.key for item in running)}", flush=True)

    def tick(self) -> None:
        self.progress.tick()


def _stop_on_sigterm() -> list[int]:
    """SIGTERM (a CI runner cancelling the job) stops `mlci run` as Ctrl-C does: its runs are
    cancelled and torn down. The list holds the signal that stopped it."""
    received = [signal.SIGINT]

    def stop(signum: int, frame: Any) -> None:
        received[0] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    return received


def _dry_run(registry: Registry, selected: list[Selected], pools: dict[str, str],
             limits: dict[str, int], args: argparse.Namespace) -> int:
    """What `mlci run` would run and why; nothing is created or changed."""
    from mlci_dagster.history.render import table

    in_progress = _active_partitions()
    rows = [["PARTITION", "POOL", "WOULD", "WHY"]]
    for s in selected:
        pool = pools[s.key]
        limit = f" (limit {limits[pool]})" if pool in limits else ""
        reservation = registry.configs[s.config].config.sandbox.reservation
        would = f"not run: already in progress ({in_progress[s.key]})" \
            if s.key in in_progress else "run" + (
                f" after the pre-batch guard of {reservation}" if reservation else "")
        rows.append([s.key, pool + limit, would, s.why])
    count = len(selected)
    print(f"would run {count} partition{'s' if count != 1 else ''}, "
          f"{min(args.parallel, count)} at a time (dry run: nothing is started)")
    print(table(rows) if selected else "the plan selects no partition")
    return 0


def _active_partitions() -> dict[str, str]:
    """Partitions with a run queued or in progress on the home, when there is one: a dry run
    creates nothing."""
    import dagster as dg

    from mlci_dagster.launch.workers import UNFINISHED
    from mlci_dagster.vocabulary import PARTITION_TAG

    home = os.environ.get("DAGSTER_HOME") or str(Path.cwd() / DEFAULT_DAGSTER_HOME)
    if not (Path(home) / "dagster.yaml").is_file():
        return {}
    os.environ.setdefault("DAGSTER_HOME", home)
    with dg.DagsterInstance.get() as instance:
        return {run.tags[PARTITION_TAG]: f"run {run.run_id[:8]}" for run in
                instance.get_runs(dg.RunsFilter(statuses=UNFINISHED))
                if PARTITION_TAG in run.tags}


def update_history(registry: str) -> str:
    """Materializes `history` and `grid_report`, as the daemon would after new results."""
    from mlci_dagster.definitions import HISTORY_JOB, build_definitions
    from mlci_dagster.launch.runner import QUIET_RUN_CONFIG

    with _instance() as instance:
        # Raised, a failed publish (the store down) would hide the grid that was drawn.
        result = build_definitions(registry).resolve_job_def(HISTORY_JOB).execute_in_process(
            instance=instance, run_config=QUIET_RUN_CONFIG, raise_on_error=False)
    for event in result.all_events:
        if event.is_step_failure:
            failure = event.step_failure_data
            why = failure.user_failure_data.description if failure.user_failure_data \
                else failure.error.message.strip()
            print(f"history update: {event.step_key} failed: {why}", file=sys.stderr)
    grid = result.asset_materializations_for_node("grid_report")
    if not grid:
        raise RuntimeError("the history update failed: its error is above")
    return str(grid[0].metadata["path"].value)


def _summaries(instance: Any, registry: Registry, keys: list[str]):
    from mlci_dagster.event_log import consolidate
    from mlci_dagster.history.analysis import analyze
    from mlci_dagster.searches import latest_searches

    # Read-only: the whole event log, so a report never waits for a history run.
    table, _ = consolidate(instance, None)
    summaries = analyze(table, keys, registry.settings.history, time.time(),
                        latest_searches(instance).values())
    return [s for s in summaries if s.partition in set(keys)], table


def _tests(instance: Any, registry: Registry):
    """(the test history, its summaries), read-only from the whole event log as _summaries."""
    from mlci_dagster.event_log import consolidate_cases
    from mlci_dagster.history.case_analysis import analyze_cases

    cases, _, _ = consolidate_cases(instance, None, 0)
    return cases, analyze_cases(cases, registry.settings.history)


def _print_report(instance: Any, registry: Registry, keys: list[str], as_json: bool) -> None:
    from mlci_dagster.event_log import late_uploads, new_results, with_late_records
    from mlci_dagster.history.analysis import signature_clusters
    from mlci_dagster.history.render import failure_notes, report_table
    from mlci_dagster.registry.quarantine import quarantine_or_none

    summaries, table = _summaries(instance, registry, keys)
    clusters = signature_clusters(table, summaries)
    linking = _resource(registry).linking()
    now = time.time()
    # Unreadable, the report still prints: `mlci validate` names the problem.
    quarantine, unreadable = quarantine_or_none(registry.root)
    quarantined = [e for e in quarantine.quarantine if e.partition in keys]
    if as_json:
        print(json.dumps({"partitions": [s.to_dict() | {"links": linking.of_row(
            s.last).to_dict() if s.last else {}} for s in summaries],
                          "signatures": [c.to_dict() for c in clusters],
                          "quarantine": [e.model_dump(mode="json") | {"active": e.active(now)}
                                         for e in quarantined]}, indent=2))
        return
    print(report_table(summaries))
    latest = with_late_records({record.partition: record
                                for _, record in new_results(instance, 0)},
                               late_uploads(instance))
    notes = failure_notes(summaries, latest, clusters, linking)
    if notes:
        print(f"\n{notes}")
    if quarantined or unreadable:
        print("\nquarantined (their failures fail no commit status or release qualification):")
        for entry in quarantined:
            print(f"  {entry.text()}" + ("" if entry.active(now) else
                                         f": EXPIRED on {entry.expires}, counts again"))
        if unreadable:
            print(f"  none applied: {unreadable.splitlines()[0]}")


TEST_FILTERS = {
    "failing": lambda t: str(t.state) == "failing",
    "flaky": lambda t: str(t.state) == "flaky",
    "slow": lambda t: t.slower_by > 0,
    "new": lambda t: t.new,
}


def cmd_tests(args: argparse.Namespace) -> int:
    from mlci_dagster.history.render import tests_table

    registry = _registry(args)
    keys = set(_keys(registry, args))
    table, summaries = _tests(_history(), registry)
    tests = [t for t in summaries if t.partition in keys
             and (args.status is None or TEST_FILTERS[args.status](t))]
    if args.json:
        print(json.dumps([t.to_dict() for t in tests[:args.limit]], indent=2))
    else:
        print(tests_table(tests, args.limit, f"no {args.status} tests" if args.status and
                          len(table) else "no test results recorded"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    registry = _registry(args)
    instance = _history()
    if args.html:
        from mlci_dagster.history.grid import write_grid

        summaries, table = _summaries(instance, registry, _keys(registry, args))
        cases, tests = _tests(instance, registry)
        path = write_grid(table, summaries, Path(args.html), tests, cases,
                          _resource(registry).linking())
        print(f"grid: {path}", file=sys.stderr)
    if args.junit:
        from mlci_dagster.event_log import new_results
        from mlci_dagster.junit.batch import latest_batch, write_batch_junit

        keys = set(_keys(registry, args))
        batch = latest_batch(r for _, r in new_results(instance, 0) if r.partition in keys)
        path, problems = write_batch_junit(Path(args.junit), batch)
        for problem in problems:
            print(f"mlci report: tests not read: {problem}", file=sys.stderr)
        print(f"junit: {path} ({len(batch)} partitions of batch "
              f"{batch[0].batch if batch else '-'})", file=sys.stderr)
    _print_report(instance, registry, _keys(registry, args), args.json)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from mlci_dagster.artifacts.publish import publish
    from mlci_dagster.artifacts.store import StoreError

    registry = _registry(args)
    instance = _history()
    summaries, table = _summaries(instance, registry, registry.partition_keys())
    cases, tests = _tests(instance, registry)
    resource = _resource(registry)
    try:
        done = publish(resource.artifact_store(), table, summaries, tests, cases,
                       resource.linking(), time.time())
    except StoreError as exc:
        print(f"mlci publish: not published: {exc}", file=sys.stderr)
        return 1
    print(f"published {done.pages} pages ({done.size:,} bytes): {done.url}")
    if done.expires_s is not None:
        print(f"its links are presigned and work for {done.expires_s / 3600:g} h; the next "
              "publish (each history update's, or this command) renews them. Set "
              "artifacts.public_url for a URL that lasts.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from mlci_dagster.history.analysis import coverage
    from mlci_dagster.history.render import status_text

    registry = _registry(args)
    summaries, _ = _summaries(_history(), registry, _keys(registry, args))
    counts = coverage(summaries)
    print(json.dumps(counts, indent=2) if args.json else status_text(counts))
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from mlci_dagster.history.render import cost_text
    from mlci_dagster.schedules import NIGHTLY_TIER
    from mlci_dagster.spend import month_spend, project_month

    registry = _registry(args)
    instance = _history()
    now = time.time()
    nightly = registry.settings.nightly
    projections = project_month(instance, registry, nightly.cron, NIGHTLY_TIER, now,
                                timezone=nightly.timezone)
    spend, _ = month_spend(instance, registry, run_id="", now=now)
    storage = _storage_used(registry)
    if args.json:
        print(json.dumps({
            "month_recorded_usd": spend.recorded_usd, "in_progress_usd": spend.in_progress_usd,
            "projected_usd": sum(p.projected_usd for p in projections),
            "budget_usd": registry.settings.budget.monthly_usd if registry.settings.budget
            else None,
            "partitions": [{"partition": p.partition, "rate_usd_h": p.rate_usd_h,
                            "runs": p.runs, "spent_usd": p.spent_usd,
                            "per_run_usd": p.per_run.usd, "per_run_basis": p.per_run.basis,
                            "runs_left": p.runs_left, "projected_usd": p.projected_usd}
                           for p in projections],
            "artifact_store": storage}, indent=2))
        return 0
    print(cost_text(projections, spend, registry.settings.budget,
                    f"{nightly.cron} ({nightly.timezone})", now))
    print(f"\nartifact store {storage['error']}" if storage["error"] else
          f"\nartifact store {storage['where']}: {storage['bytes']:,} bytes in "
          f"{storage['objects']} object(s)" + "".join(
              f"\n  {kind}: {used['bytes']:,} bytes in {used['objects']} object(s)"
              for kind, used in storage["kinds"].items()))
    return 0


def _storage_used(registry: Registry) -> dict[str, Any]:
    """What the artifact store holds, per kind (bytes, objects), listed from the store; a store
    that cannot be listed is said in `error`."""
    from dataclasses import asdict

    from mlci_dagster.artifacts.retention import usage
    from mlci_dagster.operations import list_artifact_store

    listing = list_artifact_store(_resource(registry).artifact_store())
    kinds = {kind: asdict(used) for kind, used in usage(listing.objects).items()}
    return {"where": listing.where, "error": listing.error or None,
            "bytes": sum(k["bytes"] for k in kinds.values()) if not listing.error else None,
            "objects": len(listing.objects) if not listing.error else None, "kinds": kinds}


def cmd_artifacts(args: argparse.Namespace) -> int:
    from mlci_dagster.history.render import table
    from mlci_dagster.operations import prune_artifacts

    registry = _registry(args)
    now = time.time()
    with _history() as instance:
        done = prune_artifacts(instance, _resource(registry), now, dry_run=args.dry_run)
    if not done.retention_days:
        print(f"no artifacts.retention_days in {registry.root / 'mlci.yaml'}: every object in "
              f"{done.where} is kept")
        return 0
    print(f"{done.where}: retention " + ", ".join(
        f"{kind} {days:g} days" for kind, days in sorted(done.retention_days.items()))
        + " (other kinds are kept)")

    def age(found: Any) -> str:
        return f"{(now - found.modified) / 86_400:.1f} days"

    verb = "would delete" if done.dry_run else "deleted"
    if done.deleted:
        print(f"\n{verb}:\n" + table([["KEY", "BYTES", "AGE"], *(
            [o.key, f"{o.size:,}", age(o)] for o in done.deleted)]))
    if done.kept:
        print("\nkept, past retention but referenced:\n" + table([["KEY", "AGE", "WHY"], *(
            [o.key, age(o), why] for o, why in done.kept)]))
    print(f"\n{verb} {len(done.deleted)} object(s), {done.freed_bytes:,} bytes; kept "
          f"{len(done.kept)} past retention that open regressions or active quarantines point "
          "at" + (" (dry run: nothing deleted)" if done.dry_run else ""))
    for error in done.errors:
        print(f"mlci artifacts prune: {error}", file=sys.stderr)
    return 1 if done.errors else 0


def cmd_janitor(args: argparse.Namespace) -> int:
    from mlci_dagster.history.render import table
    from mlci_dagster.operations import janitor_pass, record_guards

    registry = _registry(args)
    instance = _instance()
    done = janitor_pass(instance, _resource(registry), dry_run=args.dry_run)
    for run_id in done.lost_runs:
        print(f"run {run_id[:8]}: its worker process is gone; marked failed")
    for place in done.checkouts:
        print(f"{place}: a killed build's commit tree; removed")
    for report in done.tended:
        for line in [*report.actions, *(f"LEFT: {p}" for p in report.problems)]:
            print(f"reservation {report.reservation}: {line}")
    record_guards(instance, done)
    if done.not_tended:
        print(f"mlci janitor: reservations not tended: {done.not_tended}", file=sys.stderr)
    rows = [["SANDBOX", "RUN", "VERDICT", "RESULT"]]
    for v in done.verdicts:
        result = "-" if v.report is None else "clean" if v.report.clean else \
            f"LEFT: {v.report.left_behind()}"
        verdict = v.reason or (f"keep ({v.kept})" if v.kept else "keep (run in progress)")
        rows.append([v.sandbox_id, v.run_id[:8], verdict,
                     "would reap" if args.dry_run and v.reason else result])
    print(table(rows) if done.verdicts else "no live sandboxes")
    reaped = [v for v in done.verdicts if v.report]
    return 0 if all(v.report.clean for v in reaped) else 1


def _resource(registry: Registry):
    from mlci_dagster.resources.mlci import MlciResource

    return MlciResource(registry_path=str(registry.root))


def cmd_leases(args: argparse.Namespace) -> int:
    from mlci_dagster.reservations.report import lease_rows, leases_text

    registry = _registry(args)
    if not registry.settings.reservations:
        print(f"no reservations declared in {registry.root / 'mlci.yaml'}")
        return 0
    reservations = _resource(registry).reservations(_history())
    if args.json:
        print(json.dumps(lease_rows(reservations), indent=2))
    else:
        print(leases_text(reservations))
    return 0


def cmd_hold(args: argparse.Namespace) -> int:
    from mlci_dagster.definitions import build_definitions
    from mlci_dagster.launch.runner import QUIET_RUN_CONFIG
    from mlci_dagster.reservations.report import hold_text
    from mlci_dagster.vocabulary import HELD_SANDBOX, HOLD_DOWN_JOB, HOLD_UP_JOB, TRIGGER_TAG

    registry = _registry(args)
    daytime = [r.name for r in registry.settings.reservations if r.daytime is not None]
    if args.reservation not in daytime:
        print(f"mlci hold: '{args.reservation}' is not a reservation with a daytime intent "
              f"(expected one of: {', '.join(daytime) or f'none in {registry.root}/mlci.yaml'})",
              file=sys.stderr)
        return 2
    instance = _instance(registry)
    job = build_definitions(registry.root).resolve_job_def(
        HOLD_UP_JOB if args.action == "up" else HOLD_DOWN_JOB)
    result = job.execute_in_process(
        partition_key=args.reservation, instance=instance, raise_on_error=False,
        tags={TRIGGER_TAG: "manual (mlci hold)"},
        run_config={**QUIET_RUN_CONFIG,
                    "ops": {HELD_SANDBOX: {"config": {"action": args.action}}}})
    for failure in result.get_step_failure_events():
        error = failure.step_failure_data.error
        while error is not None and error.cause is not None:
            error = error.cause  # the hold's own error, not Dagster's wrapper
        print(f"mlci hold {args.action} {args.reservation}: "
              f"{error.message.strip() if error else 'failed'}", file=sys.stderr)
    reservations = _resource(registry).reservations(instance)
    print(hold_text(reservations, args.reservation))
    return 0 if result.success else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlci", description=__doc__,
        epilog="The history lives in the Dagster instance at $DAGSTER_HOME (default: "
               "./.dagster_home). `mlci COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"mlci-dagster {__version__}")
    registry_help = (f"the registry folder: its mlci.yaml and configs/ (default: ${REGISTRY_ENV}, "
                     "else examples/ml-platform)")
    parser.add_argument("--registry", default=str(registry_path()), metavar="PATH",
                        help=registry_help)
    # Accepted after the command too (`mlci run --registry PATH`), where it wins.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=argparse.SUPPRESS, metavar="PATH",
                        help=registry_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, fn: Any, *, filters: bool = False,
                as_json: str = "") -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=description,
                                  parents=[common])
        sub.set_defaults(fn=fn)
        if filters:
            sub.add_argument("--config", action="append", metavar="NAME",
                             help="only this config (repeat for several)")
            sub.add_argument("--engine", action="append", metavar="NAME",
                             help="only this engine (repeat for several)")
            sub.add_argument("--tier", action="append", metavar="NAME",
                             help="only configs of this tier (repeat for several)")
        if as_json:
            sub.add_argument("--json", action="store_true", help=as_json)
        return sub

    command("validate", "check the registry",
            "Validates every file of the registry: each problem is printed as `file: field: what "
            "was expected`, and the command exits 2 while any remains.", cmd_validate)
    schema = command("schema", "print the JSON Schema of a registry file",
                     "Prints the JSON Schema of a config file (configs/*.yaml) or of the root "
                     "settings file (mlci.yaml), for editors.", cmd_schema)
    schema.add_argument("--kind", choices=["config", "settings"], default="config",
                        help="which file (default: config)")
    command("list", "list the partitions", "Lists the partitions (config|engine) the registry "
            "has, with their tiers, config id and file.", cmd_list, filters=True)
    command("sync", "make the config partitions equal the registry",
            "Adds a config partition for each registry config and removes those whose config "
            "is gone; writes the registry's pool limits into $DAGSTER_HOME/dagster.yaml.",
            cmd_sync)
    run = command(
        "run", "run lifecycles through the Dagster instance at $DAGSTER_HOME",
        "Runs each selected partition's lifecycle as a Dagster run on the instance at "
        "$DAGSTER_HOME, N side by side, within pool limits, after the pre-batch guard of the "
        "reservations they use; prints a line per partition as it ends, then the report. Exits "
        "0 when every lifecycle passed or was refused (skip), 1 when one failed, was cancelled "
        "from outside or could not run, 128+N when stopped by signal N (its runs cancelled and "
        "torn down).",
        cmd_run, filters=True)
    run.add_argument("--partitions", action="append", metavar="KEYS",
                     help="these partitions, comma-separated config|engine keys (repeatable)")
    run.add_argument("--plan", metavar="FILE",
                     help="the partitions `mlci plan --json` selected, from FILE (`-`: stdin)")
    run.add_argument("--parallel", type=positive_int, default=2, metavar="N",
                     help="partitions at once (default 2)")
    run.add_argument("--max-wait", type=positive_float, metavar="SECONDS",
                     help="how long a partition waits for a slot of its pool before it is "
                          "given up (default: the longest lifecycle of that pool, its stage "
                          "timeouts end to end)")
    run.add_argument("--fail-fast", action="store_true",
                     help="at the first failure, cancel the partitions in progress and start "
                          "no more")
    run.add_argument("--dry-run", action="store_true",
                     help="say what would run and why; start nothing")
    run.add_argument("--trigger", default="manual", help=argparse.SUPPRESS)
    plan = command("plan", "what a change needs to run, and why",
                   "The partitions a change needs: the files changed from the merge base of "
                   "--base and --head, matched against what each config depends on.", cmd_plan,
                   as_json="the plan as JSON (what `mlci run --plan` takes)")
    plan.add_argument("--base", required=True, metavar="REV", help="what the change merges into")
    plan.add_argument("--head", default="HEAD", metavar="REV", help="the change (default HEAD)")
    plan.add_argument("--tier", help="only this tier's configs, as it selects them")
    plan.add_argument("--repo", metavar="PATH",
                      help="the git repository to diff (default: the registry's)")
    report = command("report", "per partition: status, last run, regression, flakiness",
                     "Prints a row per partition (status, last run, failing stage, duration, "
                     "regression range, flakiness), then the failing partitions grouped by "
                     "failure signature, each with its log and debug bundle.", cmd_report,
                     filters=True, as_json="{\"partitions\": [...], \"signatures\": [...]}")
    report.add_argument("--html", metavar="DIR", help="also write the HTML grid into DIR")
    report.add_argument("--junit", metavar="FILE",
                        help="also write the latest batch as JUnit XML into FILE (a testsuite "
                             "per partition; a testcase per stage and per test), for the CI "
                             "system that ran `mlci run` to show")
    command("publish", "the grid, partition pages and tests, to the artifact store",
            "Writes the grid, a page per partition (its runs, with their log and bundle links, "
            "and its tests) and prints the grid's URL: one a team can bookmark, where the "
            "store is public (artifacts.public_url); presigned otherwise. The published_site "
            "asset does the same after every history update.", cmd_publish)
    tests = command("tests", "per test: failing, flaky, slow, new",
                    "Prints a row per test the pipelines' reports recorded (failing, then flaky, "
                    "then slowest): its state, since when and between which images it fails, "
                    "its flips, its slowdown, its latest message.", cmd_tests, filters=True,
                    as_json="the tests as JSON")
    tests.add_argument("--status", choices=sorted(TEST_FILTERS),
                       help="only the tests failing, flaky, slow or new")
    tests.add_argument("--limit", type=positive_int, default=200, metavar="N",
                       help="at most N rows (default 200)")
    command("status", "counts and coverage: tested, untested, stale, passing",
            "Prints how many partitions are tested, untested, stale, passing, failing and "
            "flaky.", cmd_status, filters=True, as_json="the counts as JSON")
    command("cost", "this month's cost per partition, projected, against the budget",
            "This month's cost per billed partition, projected to the month's end from the "
            "nightly schedule, against the budget; and the artifact store's size per kind.",
            cmd_cost, as_json="the figures as JSON")
    command("helm-values", "the pool limits as values of the official Dagster Helm chart",
            "Prints the registry's pool limits as values for the official Dagster Helm chart "
            "(`helm upgrade -f`), whose instance ConfigMap `mlci sync` cannot write.",
            cmd_helm_values)
    qualified = command("qualified", "SHAs whose nightly run set fully passed",
                        "Lists the SHAs whose nightly run set fully passed, newest first.",
                        cmd_qualified, as_json="the list as JSON")
    qualified.add_argument("--limit", type=positive_int, default=100, metavar="N",
                           help="at most N (default 100)")
    command("leases", "who holds each reservation's slots",
            "Shows who holds each reservation's slots (test runs, daytime holds), since when, "
            "and when each lease expires.", cmd_leases, as_json="the leases as JSON")
    hold = command("hold", "stand a reservation's daytime deployment up, or take it down",
                   "Stands a reservation's daytime deployment up now, or takes it down, as its "
                   "schedules do at their hours.", cmd_hold)
    hold.add_argument("action", choices=["up", "down"], help="up or down")
    hold.add_argument("reservation", help="a reservation with a daytime intent")
    culprit = command(
        "culprit", "bisect a regression to the commit that broke it",
        "`find PARTITION`: reruns the failing partition at commits between its last pass and "
        "its first failure (as many at once as its pool and culprit_search.max_width allow) "
        "until one commit is named and confirmed by a rerun of it and its parent; exits 0 when "
        "confirmed, 1 otherwise. `list`: the searches on record (started here, by the "
        "culprit_search sensor or the find_culprit job), newest first.", cmd_culprit,
        as_json="with list: the searches as JSON")
    culprit.add_argument("action", choices=["find", "list"], help="find or list")
    culprit.add_argument("partition", nargs="?", help="with find: the failing config|engine")
    culprit.add_argument("--good", metavar="SHA", help="a commit it passed at (default: its "
                         "last pass before the latest failing streak)")
    culprit.add_argument("--bad", metavar="SHA", help="a commit it failed at (default: the "
                         "streak's first failure)")
    culprit.add_argument("--max-wait", type=positive_float, metavar="SECONDS",
                         help="how long a rerun waits for a slot of its pool (default: the "
                              "config's longest lifecycle)")
    quarantine = command(
        "quarantine", "keep a known flake from failing commit statuses, until it expires",
        "`list`: the registry's quarantine.yaml. `add PARTITION [--test ID]`: quarantine a "
        "partition (or one of its tests): it still runs and is recorded, but its failure does "
        "not fail a tier's commit status or the release qualification until --expires. "
        "`remove`: lift it.", cmd_quarantine, as_json="with list: the entries as JSON")
    quarantine.add_argument("action", choices=["list", "add", "remove"], help="list, add or "
                            "remove")
    quarantine.add_argument("partition", nargs="?", help="with add and remove: config|engine")
    quarantine.add_argument("--test", metavar="ID", help="one test of the partition (its id, as "
                            "`mlci tests` shows it)")
    quarantine.add_argument("--owner", help="with add: who answers for it")
    quarantine.add_argument("--reason", help="with add: why")
    quarantine.add_argument("--expires", metavar="YYYY-MM-DD", help="with add: the day (UTC) it "
                            "counts again (default: --days from today)")
    quarantine.add_argument("--days", type=positive_int, default=14, metavar="N",
                            help="with add: expires N days from today (default 14)")
    quarantine.add_argument("--issue", metavar="URL", help="with add: the issue tracking it")
    janitor = command("janitor", "reap sandboxes whose run is over or expired",
                      "Marks failed the runs whose `mlci run` worker is gone, takes down daytime "
                      "holds past their down time, breaks dead holders' leases, and reaps every "
                      "sandbox whose run is over or that expired.", cmd_janitor)
    janitor.add_argument("--dry-run", action="store_true", help="say what would be reaped")
    artifacts = command(
        "artifacts", "the artifact store's retention",
        "`prune`: deletes from the artifact store the objects older than their kind's "
        "artifacts.retention_days in mlci.yaml (a kind left out is kept), never the evidence of "
        "the runs an open regression or an active quarantine points at, as the "
        "artifact_retention sensor does daily; prints what it deleted and what it kept because "
        "referenced. Exits 1 when the store could not be listed or an object not deleted.",
        cmd_artifacts)
    artifacts.add_argument("action", choices=["prune"], help="prune")
    artifacts.add_argument("--dry-run", action="store_true",
                           help="say what would be deleted; delete nothing")
    return parser


def positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number of `kind` above 0, else a usage error saying so."""
    what = "whole number" if kind is int else "number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a {what} above 0, got {text}")
        return value

    return parse


positive_int, positive_float = positive(int), positive(float)


def main(argv: list[str] | None = None) -> int:
    # Progress lines as they happen, into a pipe too (`mlci run | tee`, a CI log).
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        # Ctrl-C outside mlci run's batch (which cancels its own runs): nothing to tear down.
        print(f"mlci {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except UsageError as exc:
        print(f"mlci {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RegistryError as exc:
        count = len(exc.problems)
        print(f"mlci: the registry is invalid ({count} problem{'s' if count != 1 else ''}):",
              file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
