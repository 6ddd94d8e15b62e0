"""The driver's MLflow relay (``sweeps/relay.py``): a run written through it is the run a trial writes
directly; claims name the trial's process; only requests with the relay's token are served. A real
relay on loopback and a real SQLite store, no Ray (tests/test_local_runtime.py has a Ray worker).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from mlflow import MlflowClient

import runstore
from sparse_core.config import from_flat, run_key
from sparse_core.train import run
from sweeps import relay, tracking

TINY = {"data.name": "digits", "model.width": 16, "model.depth": 2, "train.pre_epochs": 1, "train.post_epochs": 2,
        "train.device": "cpu", "prune.density": 0.1}
_VOLATILE_TAGS = {"heartbeat", "mlflow.runName"}  # a time, and a name MLflow may make up


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('relay')}/mlflow.db"


@pytest.fixture
def driver(monkeypatch):
    """A relay, and this process set up as one of its workers."""
    r = relay.Relay()
    monkeypatch.setattr(relay, "_link", None)
    monkeypatch.setenv(relay.ADDRESS_ENV, r.env[relay.ADDRESS_ENV])
    yield r
    r.close()


def _train(mlrun, cfg) -> dict:
    """What the trainable does with a run: log every step, checkpoint midway, finish."""
    result = run(cfg, lambda metrics, _: mlrun.log_step(metrics))
    mlrun.set_checkpoint_dir("/trials/t0")
    mlrun.flush()
    mlrun.finish(result)
    return result


def _as_stored(c, run_id: str, tmp: Path) -> dict:
    r = c.get_run(run_id)
    layers = Path(c.download_artifacts(run_id, "layer_density.json", str(tmp))).read_text()
    curves = {k: [(m.step, m.value) for m in c.get_metric_history(run_id, k)] for k in r.data.metrics}
    tags = {k: v for k, v in r.data.tags.items() if k not in _VOLATILE_TAGS}
    return {"status": r.info.status, "params": r.data.params, "tags": tags, "curves": curves,
            "layers": json.loads(layers)}


def test_a_run_through_the_relay_is_the_run_a_trial_writes_directly(uri, driver, torch_one_thread, tmp_path):
    cfg = from_flat(TINY)
    key = run_key(cfg)
    runs = {}
    for name, make in (("direct", tracking.TrialRun), ("relayed", relay.trial_run)):
        mlrun = make(uri, runstore.experiment_id(uri, name), sweep="s", cell="base", flat=cfg.to_flat(),
                     run_key=key, trial_id="t0", tags={"pack_size": 1}).open()
        runs[name] = (mlrun, _train(mlrun, cfg))
    assert type(runs["relayed"][0]) is relay.RemoteRun and type(runs["direct"][0]) is tracking.TrialRun
    assert runs["relayed"][1]["test_acc"] == runs["direct"][1]["test_acc"]
    c = MlflowClient(uri)
    direct, relayed = (_as_stored(c, runs[n][0].run_id, tmp_path / n) for n in ("direct", "relayed"))
    assert relayed["curves"].keys() == direct["curves"].keys()
    timed = {k for k in direct["curves"] if k.endswith("seconds") or "latency" in k}  # wall times differ
    differ = {k for k in direct["curves"] if relayed["curves"][k] != direct["curves"][k]}
    assert differ <= timed
    assert {**relayed, "curves": None} == {**direct, "curves": None}
    assert direct["status"] == "FINISHED" and len(direct["curves"]["epoch/val_acc"]) == 3
    assert direct["tags"]["checkpoint_dir"] == "/trials/t0" and direct["tags"]["claimed_by"] == relay.this_claim()

    again = relay.trial_run(uri, runstore.experiment_id(uri, "relayed"), sweep="s", cell="base", flat=cfg.to_flat(),
                            run_key=key).open()  # a FINISHED run_key: nothing to train
    assert again.skip == "finished" and again.other_id == runs["relayed"][0].run_id
    assert again.other_final["test_acc"] == runs["relayed"][1]["test_acc"]


def test_the_claim_names_the_trials_process_and_a_failure_ends_the_run(uri, driver):
    exp = runstore.experiment_id(uri, "claims")
    cfg = from_flat({**TINY, "seed": 1})
    spec = {"uri": uri, "experiment_id": exp, "sweep": "s", "cell": "base", "flat": cfg.to_flat(),
            "run_key": run_key(cfg), "trial_id": "t1", "tags": {}}
    other = relay._the_link().call({"op": "open", "run": spec, "claim": "elsewhere/4242/7"})  # a live trial elsewhere
    c = MlflowClient(uri)
    assert c.get_run(other["run_id"]).data.tags["claimed_by"] == "elsewhere/4242/7"
    mine = relay.trial_run(uri, exp, sweep="s2", cell="base", flat=cfg.to_flat(), run_key=run_key(cfg)).open()
    assert mine.skip == "claimed" and mine.other_id == other["run_id"] and mine.run_id is None

    cfg = from_flat({**TINY, "seed": 2})
    mlrun = relay.trial_run(uri, exp, sweep="s", cell="base", flat=cfg.to_flat(), run_key=run_key(cfg)).open()
    mlrun.log_step({"epoch": 1, "stage": "pre", "val_acc": 0.25})
    mlrun.fail(ValueError("diverged"))
    stored = c.get_run(mlrun.run_id)
    assert stored.info.status == "FAILED" and stored.data.tags["error"] == "ValueError: diverged"
    assert [(m.step, m.value) for m in c.get_metric_history(mlrun.run_id, "epoch/val_acc")] == [(1, 0.25)]
    with pytest.raises(tracking.TrackingError, match="no open run for handle"):
        mlrun.flush()  # ended: the relay holds no run for it any more


def test_the_relay_listens_on_loopback_and_refuses_requests_without_its_token(uri, driver, monkeypatch):
    address = json.loads(driver.env[relay.ADDRESS_ENV])["address"]
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1"
    cfg = from_flat({**TINY, "seed": 3})
    spec = {"uri": uri, "experiment_id": runstore.experiment_id(uri, "token"), "sweep": "s", "cell": "base",
            "flat": cfg.to_flat(), "run_key": run_key(cfg), "trial_id": None, "tags": {}}
    with socket.create_connection((host, int(port)), timeout=60) as sock, sock.makefile("rwb") as f:
        f.write((json.dumps({"op": "open", "run": spec, "claim": "x/1/1", "token": "guess"}) + "\n").encode())
        f.flush()
        assert "without its token" in json.loads(f.readline())["error"]
        assert f.readline() == b""  # and the connection is closed
    assert runstore.search(uri, "token", "") == []  # no run was made
    monkeypatch.delenv(relay.ADDRESS_ENV)
    monkeypatch.setattr(relay, "_link", None)
    assert type(relay.trial_run(uri, "0", sweep="s", cell="c", flat={}, run_key="k")) is tracking.TrialRun
