"""`mlci`: validate and inspect the registry, sync partitions, run lifecycles, report results."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlci_dagster.paths import REGISTRY_ENV, registry_path
from mlci_dagster.registry import Registry, RegistryError, load_registry
from mlci_dagster.registry.models import Settings, TestConfig
from mlci_dagster.vocabulary import partition_key, split_partition_key

# An embedded-default instance: SQLite storage under $DAGSTER_HOME (deploy/ holds the others).
DEFAULT_INSTANCE_YAML = "telemetry:\n  enabled: false\n"


def _registry(args: argparse.Namespace) -> Registry:
    registry = load_registry(args.registry)
    for warning in registry.warnings:
        print(f"mlci: warning: {warning}", file=sys.stderr)
    return registry


def _instance(registry: Registry | None = None):
    """The Dagster instance at $DAGSTER_HOME, which must be set: the history is the product.
    With a registry, its pool limits are written into the instance's dagster.yaml first."""
    import dagster as dg
    import yaml

    from mlci_dagster.pools import with_pool_limits

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise SystemExit(
            "mlci: DAGSTER_HOME is not set (e.g. export DAGSTER_HOME=$PWD/.dagster_home)"
        )
    Path(home).mkdir(parents=True, exist_ok=True)
    settings = Path(home) / "dagster.yaml"
    if not settings.exists():
        settings.write_text(DEFAULT_INSTANCE_YAML)
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


def cmd_helm_values(args: argparse.Namespace) -> int:
    import yaml

    from mlci_dagster.pools import helm_values

    print(yaml.safe_dump(helm_values(_registry(args).settings), sort_keys=False), end="")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    registry = _registry(args)
    print(f"{registry.root}: ok: {len(registry.configs)} configs, {len(registry.engines)} engines, "
          f"{len(registry.partitions())} partitions")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    model = TestConfig if args.kind == "config" else Settings
    print(json.dumps(model.model_json_schema(by_alias=True), indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    rows = [("PARTITION", "TIERS", "CONFIG ID", "FILE")]
    for config, engine in registry.partitions(args.config, args.engine, args.tier):
        loaded = registry.configs[config]
        rows.append((partition_key(config, engine), ",".join(loaded.config.tiers), loaded.config_id,
                     str(loaded.path.relative_to(registry.root))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from mlci_dagster.plan import PlanError, plan_revisions, render_plan

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
    from mlci_dagster.sensors.commits import qualified_releases

    with _instance() as instance:
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


def sync_partitions(instance: Any, registry: Registry) -> tuple[list[str], list[str]]:
    from mlci_dagster.assets.partitions import CONFIG_PARTITIONS, partition_changes

    existing = set(instance.get_dynamic_partitions(CONFIG_PARTITIONS.name))
    add, remove = partition_changes(set(registry.configs), existing)
    if add:
        instance.add_dynamic_partitions(CONFIG_PARTITIONS.name, add)
    for name in remove:
        instance.delete_dynamic_partition(CONFIG_PARTITIONS.name, name)
    return add, remove


def cmd_sync(args: argparse.Namespace) -> int:
    from mlci_dagster.pools import pool_limits

    registry = _registry(args)  # raises before any change: nothing is half-registered
    add, remove = sync_partitions(_instance(registry), registry)
    limits = pool_limits(registry.settings)
    print(f"config partitions: {len(registry.configs)} (added: {', '.join(add) or 'none'}; "
          f"removed: {', '.join(remove) or 'none'}); pool limits: "
          f"{', '.join(f'{n}={limit}' for n, limit in limits.items()) or 'none'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mlci_dagster.event_log import record_before
    from mlci_dagster.paths import mlci_home
    from mlci_dagster.pools import pool_limits, pool_of
    from mlci_dagster.progress import Progress
    from mlci_dagster.reservations.leases import holds_by_reservation
    from mlci_dagster.runner import PartitionRun, run_partitions

    registry = _registry(args)
    partitions = registry.partitions(args.config, args.engine, args.tier)
    if not partitions:
        raise SystemExit("mlci run: no partition matches --config/--engine/--tier")
    instance = _instance(registry)
    sync_partitions(instance, registry)
    count = len(partitions)
    print(f"running {count} partition{'s' if count != 1 else ''}, {args.parallel} at a time, "
          f"on DAGSTER_HOME={os.environ['DAGSTER_HOME']}", flush=True)
    keys = [partition_key(c, e) for c, e in partitions]
    home = mlci_home()
    progress = Progress(instance, registry, keys, home)

    def done(item: PartitionRun) -> None:
        verdict = "passed" if item.success else "LOST" if item.lost else "FAILED"
        why = f": {item.lost}; run marked failed, its sandboxes reaped" if item.lost else ""
        record = record_before(instance, item.key) if item.success else None
        if record is not None and record.run_id == item.run_id and record.skipped:
            verdict, why = "SKIPPED", f": {record.error_summary}"
        progress.finished(item.key, verdict, f"{item.seconds:.1f}s")
        print(f"  {item.key}: {verdict} in {item.seconds:.1f}s (run {item.run_id[:8]}){why}",
              flush=True)

    resource = _resource(registry)

    def reap(item: PartitionRun) -> None:
        resource.reap_run(instance, item.run_id)

    def held() -> dict[str, int]:
        return holds_by_reservation(resource.reservations(instance).store)

    def wait(item: PartitionRun) -> None:
        holds = held().get(item.pool, 0)
        why = f" (its daytime hold takes {holds} of its slots)" if holds else ""
        progress.waiting(item.key, f"pool {item.pool} is full{why}")

    start = time.monotonic()
    pools = {key: pool_of(registry, split_partition_key(key)[0]) for key in keys}
    try:
        finished = run_partitions(
            instance, registry.root, keys, pools, pool_limits(registry.settings),
            args.parallel, args.trigger, home, on_done=done, on_lost=reap, on_wait=wait,
            held=held, on_start=lambda item: progress.started(item.key, item.run_id),
            on_tick=progress.tick)
    finally:
        progress.close()
    print(f"done in {time.monotonic() - start:.1f}s", flush=True)
    grid = update_history(str(registry.root))
    print(f"history updated; grid: {grid}\n")
    _print_report(instance, registry, keys, as_json=False)
    return 0 if all(item.success for item in finished) else 1


def update_history(registry: str) -> str:
    """Materializes `history` and `grid_report`, as the daemon would after new results."""
    from mlci_dagster.definitions import HISTORY_JOB, build_definitions
    from mlci_dagster.runner import QUIET_RUN_CONFIG

    with _instance() as instance:
        result = build_definitions(registry).resolve_job_def(HISTORY_JOB).execute_in_process(
            instance=instance, run_config=QUIET_RUN_CONFIG)
    [materialization] = result.asset_materializations_for_node("grid_report")
    return str(materialization.metadata["path"].value)


def _summaries(instance: Any, registry: Registry, keys: list[str]):
    from mlci_dagster.event_log import consolidate
    from mlci_dagster.history.analysis import analyze

    # Read-only: the whole event log, so a report never waits for a history run.
    table, _ = consolidate(instance, None)
    summaries = analyze(table, keys, registry.settings.history, time.time())
    return [s for s in summaries if s.partition in set(keys)], table


def _print_report(instance: Any, registry: Registry, keys: list[str], as_json: bool) -> None:
    from mlci_dagster.event_log import new_results
    from mlci_dagster.history.analysis import signature_clusters
    from mlci_dagster.history.render import failure_notes, report_table

    summaries, table = _summaries(instance, registry, keys)
    clusters = signature_clusters(table, summaries)
    if as_json:
        print(json.dumps({"partitions": [s.to_dict() for s in summaries],
                          "signatures": [c.to_dict() for c in clusters]}, indent=2))
        return
    print(report_table(summaries))
    latest = {record.partition: record for _, record in new_results(instance, 0)}
    notes = failure_notes(summaries, latest, clusters)
    if notes:
        print(f"\n{notes}")


def _keys(registry: Registry, args: argparse.Namespace) -> list[str]:
    return [partition_key(c, e)
            for c, e in registry.partitions(args.config, args.engine, args.tier)]


def cmd_report(args: argparse.Namespace) -> int:
    registry = _registry(args)
    instance = _instance()
    if args.html:
        from mlci_dagster.assets.history import write_grid

        summaries, table = _summaries(instance, registry, _keys(registry, args))
        path = write_grid(table, summaries, Path(args.html))
        print(f"grid: {path}", file=sys.stderr)
    _print_report(instance, registry, _keys(registry, args), args.json)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from mlci_dagster.history.analysis import coverage
    from mlci_dagster.history.render import status_text

    registry = _registry(args)
    summaries, _ = _summaries(_instance(), registry, _keys(registry, args))
    counts = coverage(summaries)
    print(json.dumps(counts, indent=2) if args.json else status_text(counts))
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from mlci_dagster.history.render import cost_text
    from mlci_dagster.schedules import NIGHTLY_TIER
    from mlci_dagster.spend import month_spend, project_month

    registry = _registry(args)
    instance = _instance()
    now = time.time()
    nightly = registry.settings.nightly
    projections = project_month(instance, registry, nightly.cron, NIGHTLY_TIER, now,
                                timezone=nightly.timezone)
    spend, _ = month_spend(instance, registry, run_id="", now=now)
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
                           for p in projections]}, indent=2))
        return 0
    print(cost_text(projections, spend, registry.settings.budget,
                    f"{nightly.cron} ({nightly.timezone})", now))
    return 0


def cmd_janitor(args: argparse.Namespace) -> int:
    from mlci_dagster.history.render import table
    from mlci_dagster.janitor import registry_providers, registry_teardown_timeout, sweep
    from mlci_dagster.paths import mlci_home
    from mlci_dagster.reservations.guard import tend
    from mlci_dagster.reservations.leases import LeaseError
    from mlci_dagster.run_workers import end_lost_runs, run_over

    registry = _registry(args)
    instance = _instance()
    reservations = _resource(registry).reservations(instance)
    if not args.dry_run:
        for run_id in end_lost_runs(instance):
            print(f"run {run_id[:8]}: its worker process is gone; marked failed")
        try:
            for report in tend(reservations):
                for line in [*report.actions, *(f"LEFT: {p}" for p in report.problems)]:
                    print(f"reservation {report.reservation}: {line}")
                if report.actions or report.problems:
                    _record_guard(instance, reservations, report)
        except LeaseError as exc:
            print(f"mlci janitor: reservations not tended: {exc}", file=sys.stderr)
    verdicts = sweep(registry_providers(registry, mlci_home()), run_over(instance),
                     teardown_timeout=registry_teardown_timeout(registry),
                     dry_run=args.dry_run, keep=reservations.keep_held())
    rows = [["SANDBOX", "RUN", "VERDICT", "RESULT"]]
    for v in verdicts:
        result = "-" if v.report is None else "clean" if v.report["clean"] else (
            f"LEFT: {v.report['why']}" if v.report.get("why") else
            f"LEFT: pids {v.report['leaked_pids']} ports {v.report['busy_ports']}")
        verdict = v.reason or (f"keep ({v.kept})" if v.kept else "keep (run in progress)")
        rows.append([v.sandbox_id, v.run_id[:8], verdict,
                     "would reap" if args.dry_run and v.reason else result])
    print(table(rows) if verdicts else "no live sandboxes")
    reaped = [v for v in verdicts if v.report]
    return 0 if all(v.report["clean"] for v in reaped) else 1


def _resource(registry: Registry):
    from mlci_dagster.resources.mlci import MlciResource

    return MlciResource(registry_path=str(registry.root))


def _record_guard(instance: Any, reservations: Any, report: Any) -> None:
    from mlci_dagster.assets.reservations import record_guard

    record_guard(instance, reservations, report)


def cmd_leases(args: argparse.Namespace) -> int:
    from mlci_dagster.reservations.report import lease_rows, leases_text

    registry = _registry(args)
    if not registry.settings.reservations:
        print(f"no reservations declared in {registry.root / 'mlci.yaml'}")
        return 0
    reservations = _resource(registry).reservations(_instance())
    if args.json:
        print(json.dumps(lease_rows(reservations), indent=2))
    else:
        print(leases_text(reservations))
    return 0


def cmd_hold(args: argparse.Namespace) -> int:
    from mlci_dagster.definitions import build_definitions
    from mlci_dagster.reservations.report import hold_text
    from mlci_dagster.resources.mlci import TRIGGER_TAG
    from mlci_dagster.runner import QUIET_RUN_CONFIG
    from mlci_dagster.vocabulary import HELD_SANDBOX, HOLD_DOWN_JOB, HOLD_UP_JOB

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
    parser = argparse.ArgumentParser(prog="mlci", description=__doc__)
    parser.add_argument("--registry", default=str(registry_path()),
                        help=f"registry folder (default: ${REGISTRY_ENV} or the example)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("validate", help="validate the registry").set_defaults(fn=cmd_validate)
    schema = commands.add_parser("schema", help="print the JSON Schema of a registry file")
    schema.add_argument("--kind", choices=["config", "settings"], default="config")
    schema.set_defaults(fn=cmd_schema)
    commands.add_parser("sync", help="make the config partitions equal the registry"
                        ).set_defaults(fn=cmd_sync)

    def with_filters(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config")
        sub.add_argument("--engine")
        sub.add_argument("--tier")
        return sub

    with_filters("list", "list partitions").set_defaults(fn=cmd_list)
    run = with_filters("run", "run lifecycles through the Dagster instance at $DAGSTER_HOME")
    run.add_argument("--parallel", type=int, default=2, help="partitions at once (default 2)")
    run.add_argument("--trigger", default="manual", help=argparse.SUPPRESS)
    run.set_defaults(fn=cmd_run)
    plan = commands.add_parser("plan", help="the partitions a change needs: files changed from "
                               "the merge base of --base and --head, matched against what each "
                               "config depends on")
    plan.add_argument("--base", required=True, metavar="REV", help="what the change merges into")
    plan.add_argument("--head", default="HEAD", metavar="REV", help="the change (default HEAD)")
    plan.add_argument("--tier", help="only this tier's configs, as it selects them")
    plan.add_argument("--repo", metavar="PATH",
                      help="the git repository to diff (default: the registry's)")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(fn=cmd_plan)
    report = with_filters("report", "per partition: status, last run, regression, flakiness")
    report.add_argument("--json", action="store_true")
    report.add_argument("--html", metavar="DIR", help="also write the HTML grid into DIR")
    report.set_defaults(fn=cmd_report)
    status = with_filters("status", "counts and coverage: tested, untested, stale, passing")
    status.add_argument("--json", action="store_true")
    status.set_defaults(fn=cmd_status)
    cost = commands.add_parser("cost", help="this month's cost per partition, projected to "
                               "the month's end from the nightly schedule, against the budget")
    cost.add_argument("--json", action="store_true")
    cost.set_defaults(fn=cmd_cost)
    commands.add_parser("helm-values", help="the registry's pool limits as values of the "
                        "official Dagster Helm chart").set_defaults(fn=cmd_helm_values)
    qualified = commands.add_parser("qualified", help="SHAs whose nightly run set fully "
                                    "passed, newest first")
    qualified.add_argument("--limit", type=int, default=100)
    qualified.add_argument("--json", action="store_true")
    qualified.set_defaults(fn=cmd_qualified)
    leases = commands.add_parser("leases", help="who holds each reservation's slots")
    leases.add_argument("--json", action="store_true")
    leases.set_defaults(fn=cmd_leases)
    hold = commands.add_parser("hold", help="stand a reservation's daytime deployment up, or "
                               "take it down, now")
    hold.add_argument("action", choices=["up", "down"])
    hold.add_argument("reservation")
    hold.set_defaults(fn=cmd_hold)
    janitor = commands.add_parser("janitor", help="reap sandboxes whose run is over or expired")
    janitor.add_argument("--dry-run", action="store_true", help="say what would be reaped")
    janitor.set_defaults(fn=cmd_janitor)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Progress lines as they happen, into a pipe too (`mlci run | tee`, a CI log).
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except RegistryError as exc:
        count = len(exc.problems)
        print(f"mlci: the registry is invalid ({count} problem{'s' if count != 1 else ''}):",
              file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
