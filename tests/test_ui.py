"""Our experiments open in MLflow's model-training view, not its GenAI overview.

MLflow's UI (3.17 and 3.18) takes an experiment page's kind from its workflow switch: the ``workflowType``
URL parameter, else the browser's saved choice, which starts as ``genai``. So the links we print
carry ``workflowType=machine_learning`` (and ``viewStateShareKey=study``, a runs-table view stored
as an experiment tag), and experiments carry ``mlflow.experimentKind=custom_model_development``.
The fast test checks that the installed UI still works that way; the slow one loads our link in
headless Chromium against a real ``mlflow server`` (skipped where Chromium is not installed).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import runstore

BUNDLE = os.path.join(os.path.dirname(__import__("mlflow").__file__), "server", "js", "build", "static", "js")


def _bundle() -> str:
    files = glob.glob(os.path.join(BUNDLE, "*.js"))
    assert files, f"no MLflow UI bundle under {BUNDLE}"
    return "".join(open(f, encoding="utf-8", errors="replace").read() for f in files)


ID = r"[\w$]+"  # a minified JavaScript name: they change between releases (3.17 -> 3.18), the strings do not


def test_the_installed_ui_reads_the_switches_our_links_set():
    js = _bundle()
    # the workflow switch: saved per browser, GenAI unless the URL says otherwise
    start = re.search(rf'key:"mlflow\.workflowType",version:1,initialValue:({ID})', js)
    assert start and re.search(rf"(?:const |,){re.escape(start[1])}={ID}\.GENAI\b", js)
    assert 'e.get("workflowType")' in js and 'e.MACHINE_LEARNING="machine_learning"' in js
    assert runstore.UI_QUERY == "workflowType=machine_learning"
    # the experiment kind tag and its training value
    assert '"mlflow.experimentKind"' in js and 'CUSTOM_MODEL_DEVELOPMENT="custom_model_development"' in js
    assert (runstore.EXPERIMENT_KIND_TAG, runstore.EXPERIMENT_KIND) == ("mlflow.experimentKind",
                                                                         "custom_model_development")
    # shared views: ?viewStateShareKey=K reads the experiment tag mlflow.sharedViewState.K
    assert re.search(rf'{ID}="viewStateShareKey",{ID}="mlflow\.sharedViewState\."', js)
    assert runstore.VIEW_TAG == "mlflow.sharedViewState." + runstore.STUDY_VIEW
    # the view's Group by: tag/param keys, an aggregate, groups collapsed by id "<mode>.<key>.<value>,..."
    assert '"groupBy","groupsExpanded"' in js and 'e.Tag="tag",e.Param="param"' in js
    assert 'e.Average="average"' in js and "groupByKeys" in js and "aggregateFunction:n,groupByKeys" in js
    assert re.search(ID + re.escape("=({groupByData:e,mode:t,value:n})=>`${t}.${e}.${n||null}`"), js)  # group_id's format
    assert {k["mode"] for k in runstore.GROUP_BY["groupByKeys"]} <= {"tag", "param"}
    assert runstore.group_id("full", 0.01) == "tag.cell.full,param.prune.density.0.01"
    # a trial run nests under its sweep's run by MLflow's tag
    assert '"mlflow.parentRunId"' in js and runstore.PARENT_TAG == "mlflow.parentRunId"
    # chart sections: named prefixes sorted by name, unprefixed "Model metrics" last
    assert 'e.sort((e,t)=>e.name.localeCompare(t.name))' in js
    assert sorted([runstore.EPOCH_PREFIX, runstore.FINAL_PREFIX, runstore.PRUNE_PREFIX,
                   runstore.TRAINER_PREFIX])[0] == runstore.EPOCH_PREFIX


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dom(url: str, profile: str) -> str:
    proc = subprocess.run([shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=30000",
                           "--dump-dom", url], capture_output=True, text=True, timeout=600)
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_our_link_opens_the_runs_table_in_headless_chromium(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp_id = runstore.experiment_id(uri, "ui-check")
    c = runstore.client(uri)
    run = c.create_run(exp_id, run_name="full d=0.01 s=0", tags={"cell": "full"})
    c.log_metric(run.info.run_id, "final/val_acc", 0.9, step=3)
    c.set_terminated(run.info.run_id)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(1)
        _, url = runstore.ui_link(uri, exp_id, port=port)
        ours = _dom(url, str(tmp_path / "p1"))
        assert "matching run" in ours and "final/val_acc" in ours and "full d=0.01 s=0" in ours, ours[-3000:]
        assert "Detect Issues" not in ours
        assert "Group: cell" in ours and "(average)" in ours  # grouped by cell and density, seeds averaged
        # the control: the same experiment without the switch opens the GenAI overview
        plain = _dom(f"http://127.0.0.1:{port}/#/experiments/{exp_id}", str(tmp_path / "p2"))
        assert "Detect Issues" in plain or "Traces" in plain, plain[-3000:]
        assert "matching run" not in plain
    finally:
        server.terminate()
        server.wait(timeout=120)
