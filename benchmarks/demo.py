"""The ML platform demo: the whole matrix of examples/ml-platform through Dagster, against the
same work done by a plain sequential script without Dagster.

1. Makes sure the platform image is built in the image home (--image-home, default
   $MLCI_IMAGE_HOME or ~/.cache/mlci-dagster; the venv lives at its stable path, since the
   image record holds it), so both runs below start warm: their homes link their image cache
   (`mlci/images`) there.
2. Runs `mlci run --parallel N` on a fresh DAGSTER_HOME: wall time, and the peak memory of the
   whole process tree (services, Ray workers and jobs, JVMs included), sampled every 0.5 s as
   the sum of RSS and the sum of PSS (RSS counts pages shared between processes once per
   process; PSS splits them, so it adds up to what the tree really holds).
3. Runs the same partitions one after another by calling the Dagster-free stage functions
   directly (build_image, start_sandbox, run_pipelines, smoke_test_ui, tear_down), with the
   same sampling.
4. Prints both, their ratio, each partition's result, and anything left behind (processes,
   ledger entries, sandbox directories, Ray session links, /dev/shm entries), then removes the
   temporary homes.

Run: .venv/bin/python benchmarks/demo.py [--parallel 2] [--config C] [--engine E]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

from mlci_dagster.providers.host import SANDBOX_ID_ENV
from mlci_dagster.providers.processes import marked_processes
from mlci_dagster.vocabulary import Launch

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "examples" / "ml-platform"
GOALS = {"wall_s": 8 * 60, "peak_gib": 8.0, "ratio": 1.0}


# --- memory of a process tree ----------------------------------------------------------------


def _tree(root: int) -> list[int]:
    try:
        process = psutil.Process(root)
        return [root, *(child.pid for child in process.children(recursive=True))]
    except psutil.Error:
        return []


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes; (0, 0) for a process that is gone."""
    try:
        info = psutil.Process(pid).memory_full_info()
        return info.rss, getattr(info, "pss", 0)
    except psutil.Error:
        return 0, 0


class TreeSampler(threading.Thread):
    """Samples the memory of `pid`'s process tree until stopped; keeps the peaks.

    Processes that leave the tree (a job started in a new session stays a descendant; only
    re-parented orphans leave it) are not counted.
    """

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            pids = _tree(self.pid)
            rss = pss = 0
            for pid in pids:
                r, p = _memory(pid)
                rss, pss = rss + r, pss + p
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(pids))
            self._done.wait(self.interval_s)

    def stop(self) -> None:
        self._done.set()
        self.join()


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, TreeSampler, int, str]:
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    output, _ = proc.communicate()
    elapsed = time.monotonic() - start
    sampler.stop()
    return elapsed, sampler, proc.returncode, output


# --- the two ways of running the matrix -------------------------------------------------------


def make_home(parent: Path, name: str, image_cache: Path) -> Path:
    home = parent / name
    (home / "mlci").mkdir(parents=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    (home / "mlci" / "images").symlink_to(image_cache, target_is_directory=True)
    return home


def warm_image(image_home: Path, config: str, engine: str) -> dict:
    from mlci_dagster.registry import load_registry
    from mlci_dagster.stages.context import LifecycleContext
    from mlci_dagster.stages.image import build_image

    ctx = LifecycleContext.create(load_registry(REGISTRY), config, engine, "warm-up",
                                  image_home)
    outcome = build_image(ctx)
    if not outcome.passed:
        raise SystemExit(f"image build failed:\n{outcome.error_summary}")
    return {"cached": outcome.details.cached, "seconds": outcome.duration_s,
            "digest": outcome.details.digest}


def sequential_worker(home: Path, partitions: list[tuple[str, str]]) -> None:
    """The same lifecycle without Dagster: the stage functions, one partition after another."""
    from mlci_dagster.registry import load_registry
    from mlci_dagster.stages.context import LifecycleContext
    from mlci_dagster.stages.lifecycle import run_lifecycle
    from mlci_dagster.stages.results import build_record

    registry = load_registry(REGISTRY)
    results = {}
    for config, engine in partitions:
        start = time.monotonic()
        ctx = LifecycleContext.create(registry, config, engine, uuid.uuid4().hex, home / "mlci")
        ctx.launch = Launch(trigger="script")
        record = build_record(ctx, list(run_lifecycle(ctx)))
        results[f"{config}|{engine}"] = {"status": record.status,
                                         "seconds": round(time.monotonic() - start, 1),
                                         "error": record.error_summary[-300:]}
    print("RESULTS " + json.dumps(results))


def dagster_results(home: Path, keys: list[str]) -> dict[str, dict]:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    code = (
        "import json, sys, dagster as dg\n"
        "RESULTS_ASSET = dg.AssetKey('results')\n"
        "out = {}\n"
        "with dg.DagsterInstance.get() as instance:\n"
        "    for key in sys.argv[1:]:\n"
        "        recs = instance.fetch_materializations(dg.AssetRecordsFilter(\n"
        "            asset_key=RESULTS_ASSET, asset_partitions=[key]), limit=1).records\n"
        "        r = recs[0].asset_materialization.metadata['record'].value if recs else None\n"
        "        out[key] = {'status': r['status'], 'seconds': round(r['duration_s'], 1),\n"
        "                    'error': r['error_summary'][-300:]} if r else {'status': 'none'}\n"
        "print('RESULTS ' + json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *keys], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    return _parse_results(done.stdout + done.stderr)


def _parse_results(output: str) -> dict[str, dict]:
    for line in output.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line.removeprefix("RESULTS "))
    raise SystemExit(f"no results in the output:\n{output[-3000:]}")


# --- what is left behind -----------------------------------------------------------------------


def leftovers(homes: list[Path], shm_before: set[str]) -> list[str]:
    sandbox_ids = {p.name for h in homes for p in (h / "mlci" / "logs").glob("*")}
    found = [f"process {pid}" for sandbox in sandbox_ids
             for pid in marked_processes(SANDBOX_ID_ENV, sandbox)]
    for home in homes:
        found += [f"ledger entry {p}" for p in (home / "mlci" / "ledger").glob("*.json")]
        sandboxes = home / "mlci" / "sandboxes"
        found += [f"sandbox directory {p}" for p in sandboxes.iterdir()] if sandboxes.exists() \
            else []
    links = Path("/tmp/mlci-ray")
    if links.exists():
        found += [f"ray session link {p}" for p in links.iterdir()]
    found += [f"/dev/shm/{name}" for name in set(os.listdir("/dev/shm")) - shm_before]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--config")
    parser.add_argument("--engine")
    parser.add_argument("--image-home", type=Path, default=Path(
        os.environ.get("MLCI_IMAGE_HOME") or Path.home() / ".cache" / "mlci-dagster"))
    parser.add_argument("--skip-sequential", action="store_true")
    parser.add_argument("--sequential-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    from mlci_dagster.registry import load_registry

    partitions = load_registry(REGISTRY).partitions(args.config, args.engine)
    if args.sequential_worker:
        return sequential_worker(args.sequential_worker, partitions)
    keys = [f"{c}|{e}" for c, e in partitions]
    image_home = args.image_home.resolve()
    (image_home / "images").mkdir(parents=True, exist_ok=True)
    shm_before = set(os.listdir("/dev/shm"))
    tmp = Path(tempfile.mkdtemp(prefix="mlci-demo-"))
    try:
        print(f"{len(keys)} partitions of {REGISTRY.relative_to(ROOT)}, cpus: {os.cpu_count()}, "
              f"image home: {image_home}", flush=True)
        dagster_home = make_home(tmp, "dagster_home", image_home / "images")
        image = warm_image(image_home, *partitions[0])
        print(f"image {image['digest'][:19]}: "
              + ("cached" if image["cached"] else f"built cold in {image['seconds']:.0f}s"),
              flush=True)

        env = {**os.environ, "DAGSTER_HOME": str(dagster_home)}
        run_argv = [sys.executable, "-m", "mlci_dagster.cli", "--registry", str(REGISTRY), "run",
                    "--parallel", str(args.parallel)]
        for flag in ("config", "engine"):
            if getattr(args, flag):
                run_argv += [f"--{flag}", getattr(args, flag)]
        print(f"dagster: mlci run --parallel {args.parallel} ...", flush=True)
        d_wall, d_mem, _, d_out = timed(run_argv, env)
        d_results = dagster_results(dagster_home, keys)
        if any(r.get("status") == "none" for r in d_results.values()):
            print(f"mlci run output (tail):\n{d_out[-3000:]}")
        homes = [dagster_home]

        s_wall = s_mem = s_results = None
        if not args.skip_sequential:
            print("plain script: the same partitions one after another ...", flush=True)
            seq_home = make_home(tmp, "sequential_home", image_home / "images")
            homes.append(seq_home)
            argv = [sys.executable, __file__, "--sequential-worker", str(seq_home)]
            for flag in ("config", "engine"):
                if getattr(args, flag):
                    argv += [f"--{flag}", getattr(args, flag)]
            s_wall, s_mem, _, s_out = timed(argv, {**os.environ})
            s_results = _parse_results(s_out)

        left = leftovers(homes, shm_before)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    gib = 2**30
    print(f"\n{'PARTITION':26} {'DAGSTER':>16} {'PLAIN SCRIPT':>16}")
    for key in keys:
        d = d_results.get(key, {})
        s = (s_results or {}).get(key, {})
        print(f"{key:26} {d.get('status', '-'):>9} {d.get('seconds', 0):5.1f}s "
              f"{s.get('status', '-'):>9} {s.get('seconds', 0):5.1f}s")
    for name, results in (("dagster", d_results), ("plain script", s_results or {})):
        for key, r in results.items():
            if r.get("status") != "pass":
                print(f"  {name} {key}: {r.get('status')}: {r.get('error', '').strip()[-300:]}")
    print(f"\ndagster (parallel {args.parallel}): {d_wall:6.1f}s wall, peak memory "
          f"{d_mem.peak_pss / gib:.2f} GiB PSS ({d_mem.peak_rss / gib:.2f} GiB summed RSS, "
          f"{d_mem.peak_processes} processes)")
    if s_wall is not None:
        print(f"plain script (sequential): {s_wall:6.1f}s wall, peak memory "
              f"{s_mem.peak_pss / gib:.2f} GiB PSS ({s_mem.peak_rss / gib:.2f} GiB summed RSS)")
        print(f"ratio dagster / plain script: {d_wall / s_wall:.2f}")
    print(f"left behind: {', '.join(left) if left else 'nothing'}")
    goals = [("wall", d_wall <= GOALS["wall_s"], f"<= {GOALS['wall_s'] / 60:.0f} min"),
             ("peak memory", d_mem.peak_rss / gib <= GOALS["peak_gib"],
              f"<= {GOALS['peak_gib']:.0f} GiB (summed RSS)")]
    if s_wall is not None:
        goals.append(("ratio", d_wall / s_wall <= GOALS["ratio"], f"<= {GOALS['ratio']}"))
    for name, met, goal in goals:
        print(f"goal {name} {goal}: {'met' if met else 'NOT met'}")
    all_passed = all(r.get("status") == "pass" for r in d_results.values())
    if s_results is not None:
        all_passed = all_passed and all(r.get("status") == "pass" for r in s_results.values())
    sys.exit(0 if all_passed and not left else 1)


if __name__ == "__main__":
    main()
