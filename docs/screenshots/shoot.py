"""Screenshots of a sweep in the MLflow UI (docs/screenshots/*.png), taken in headless Chromium.

    python docs/screenshots/shoot.py sqlite:////abs/path/mlflow.db sparsity-sweep docs/screenshots

Needs Playwright (``pip install playwright``) and a Chromium (``apt-get install chromium``; Playwright's
own browser download is not needed). Starts ``mlflow server`` on a free loopback port, opens the
link a sweep prints (the runs table, grouped by cell and density), the sweep's parent run and the
metrics tab of one child run, and writes ``mlflow_runs_table.png``, ``mlflow_parent_run.png`` and
``mlflow_run_charts.png``; with a fourth argument, the report's ``index.html`` (what
``reports/<sweep>/`` holds), its first screen as ``report.png``.

    python docs/screenshots/shoot.py sqlite:////abs/path/mlflow.db sparsity-sweep docs/screenshots \
        /abs/path/reports/laptop-leave-one-out/index.html
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import runstore  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(uri: str, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    server.terminate()
    raise SystemExit("mlflow server did not start")


def shoot(uri: str, experiment: str, out: str) -> list[str]:
    from playwright.sync_api import sync_playwright

    c = runstore.client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = runstore.search_ids(c, [exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get(runstore.ROLE_TAG) == runstore.SWEEP_ROLE)
    child = next(r for r in runs if r.data.tags.get(runstore.PARENT_TAG) == parent.info.run_id)
    port = _free_port()
    server = _serve(uri, port)
    base = f"http://127.0.0.1:{port}"
    _, table = runstore.ui_link(uri, exp.experiment_id, port)
    run_page = f"{base}/#/experiments/{exp.experiment_id}/runs/{{}}?{runstore.UI_QUERY}"
    pages = [(table, "mlflow_runs_table.png", "matching runs"),
             (run_page.format(parent.info.run_id), "mlflow_parent_run.png", "sweep/trained"),
             (run_page.format(child.info.run_id).replace("?", "/model-metrics?"), "mlflow_run_charts.png",
              "epoch/test_acc")]
    written = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            for url, name, shows in pages:
                page.goto(url)
                page.wait_for_load_state("load")
                page.get_by_text(shows).first.wait_for(timeout=120_000)
                close = page.get_by_role("button", name="Close")  # the assistant's side panel
                if close.count():
                    close.first.click()
                time.sleep(10)
                path = os.path.join(out, name)
                page.screenshot(path=path)
                written.append(path)
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    return written


def shoot_report(index_html: str, out: str) -> str:
    """The first screen of the analysis report's page, as ``report.png`` in ``out``."""
    from playwright.sync_api import sync_playwright

    path = os.path.join(out, "report.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 1500})
        page.goto(Path(index_html).resolve().as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=path)
        browser.close()
    return path


if __name__ == "__main__":
    print("\n".join(shoot(*sys.argv[1:4])))
    if len(sys.argv) > 4:
        print(shoot_report(sys.argv[4], sys.argv[3]))
