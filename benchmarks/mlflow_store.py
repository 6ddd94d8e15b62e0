"""What a sweep's fresh SQLite MLflow store costs, and what a copied template would cost instead.

Each variant runs in a fresh Python process (MLflow caches stores per process) and reports the
wall and CPU seconds of one step after ``import mlflow`` (timed on its own):

- **create**: ``MlflowClient("sqlite:///new.db").search_experiments()`` on a file that does not
  exist: MLflow creates the initial tables, then runs every Alembic migration, each its own
  transaction (what the first sweep into a new store pays).
- **open existing**: the same call on a store that already has the schema.
- **copy template + open**: ``shutil.copyfile`` of an empty store made earlier (same MLflow
  version), then the same call; MLflow still checks the schema revision on open.

    python benchmarks/mlflow_store.py            # 3 rounds, about a minute on 2 CPU cores
    python benchmarks/mlflow_store.py --tiny     # 1 round (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from timing import ROOT, print_table  # also puts the repo root on sys.path

STEP = r"""
import json, os, resource, shutil, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
w0, c0 = time.perf_counter(), cpu()
from mlflow.tracking import MlflowClient
w1, c1 = time.perf_counter(), cpu()
template, target = sys.argv[1], sys.argv[2]
if template:
    shutil.copyfile(template, target)
MlflowClient(tracking_uri="sqlite:///" + target).search_experiments()
w2, c2 = time.perf_counter(), cpu()
print(json.dumps({"import_wall": w1 - w0, "import_cpu": c1 - c0, "wall": w2 - w1, "cpu": c2 - c1}))
"""


def step(template: str, target: str) -> dict:
    env = {**os.environ, "MLFLOW_LOGGING_LEVEL": "WARNING"}
    out = subprocess.run([sys.executable, "-c", STEP, template, target], capture_output=True, text=True,
                         timeout=600, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise SystemExit(f"error: the MLflow step failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="one round (the smoke test)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, variants alternating in order (default 3)")
    ap.add_argument("--threads", type=int, help="ignored (accepted for symmetry with the other benchmarks)")
    args = ap.parse_args(argv)
    from importlib.metadata import version

    import torch

    print(f"# MLflow SQLite store set-up: mlflow {version('mlflow')}, SQLAlchemy {version('sqlalchemy')}, "
          f"alembic {version('alembic')} | torch {torch.__version__}")
    print("# device cpu (no torch work; CPU seconds of the measuring process)")
    rounds = 1 if args.tiny else args.rounds
    work = tempfile.mkdtemp(prefix="mlflow_store_")
    try:
        template = os.path.join(work, "template.db")
        step("", template)  # the template: an empty store with the full schema
        names = ("create", "open existing", "copy template + open")
        seen: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                target = os.path.join(work, f"r{r}-{name.split()[0]}.db")
                if name == "open existing":
                    shutil.copyfile(template, target)
                seen[name].append(step(template if name.startswith("copy") else "", target))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = lambda rows, k: statistics.median(row[k] for row in rows)  # noqa: E731
    every = [row for rows in seen.values() for row in rows]
    rows = [["import mlflow", f"{med(every, 'import_wall'):.2f}", f"{med(every, 'import_cpu'):.2f}"]]
    rows += [[name, f"{med(seen[name], 'wall'):.2f}", f"{med(seen[name], 'cpu'):.2f}"] for name in names]
    print(f"\n## median over {rounds} round(s), each step in a fresh process")
    print_table(["step", "wall s", "CPU s"], rows)
    create, copy = med(seen["create"], "cpu"), med(seen["copy template + open"], "cpu")
    print(f"\n# a copied template would save {create - copy:.2f} CPU s of the {create:.2f} CPU s a new store costs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
