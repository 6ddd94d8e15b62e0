"""The driver's MLflow relay (``sweeps/relay.py``): a run written through it is the run a trial writes
directly; claims name the trial's process; it is a capability: the token is in a private file, a
request cannot name the store, experiment or sweep, opens only its sweep's run_keys, writes only runs
its caller opened, exports bytes and never a path; its lines, connections and idle time are bounded.
A real relay on loopback and a real SQLite store, no Ray (tests/test_local_runtime.py has a Ray worker,
and checks that Ray's logs never hold the token).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

import runstore
from sparse_core.config import from_flat, run_key, to_flat
from sparse_core.train import run
from sweeps import relay, sweep_run, tracking
from sweeps.designs import Trial

TINY = {"data.name": "digits", "model.width": 16, "model.depth": 2, "train.pre_epochs": 1, "train.post_epochs": 2,
        "train.device": "cpu", "prune.density": 0.1}
_VOLATILE_TAGS = {"heartbeat", "mlflow.runName"}  # a time, and a name MLflow may make up


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('relay')}/mlflow.db"


def make_driver(monkeypatch, **limits) -> relay.Relay:
    """A relay, and this process set up as one of its workers."""
    r = relay.Relay(**limits)
    monkeypatch.setattr(relay, "_link", None)
    monkeypatch.setenv(relay.ADDRESS_ENV, r.env[relay.ADDRESS_ENV])
    return r


@pytest.fixture
def driver(monkeypatch):
    r = make_driver(monkeypatch)
    yield r
    r.close()


def scope(uri: str, experiment: str, *cfgs, sweep: str = "s", storage: str | None = None) -> relay.Scope:
    """The sweep the relay serves: these configs (cell "base"), in ``experiment``."""
    trials = [Trial("base", to_flat(cfg)) for cfg in cfgs]
    return relay.Scope.of(uri, runstore.experiment_id(uri, experiment), sweep, trials, storage)


def raw(r: relay.Relay, token: str | None = None):
    """A connection to the relay that has presented ``token`` (default: the relay's own, from its file)."""
    host, port = r.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    f = sock.makefile("rwb")
    send(f, {"token": relay._read_token(r.token_file) if token is None else token})
    return sock, f, json.loads(f.readline())


def send(f, request: dict) -> None:
    f.write((json.dumps(request) + "\n").encode())
    f.flush()


def ask(f, request: dict) -> dict:
    send(f, request)
    return json.loads(f.readline())


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
    tags = {k: v for k, v in r.data.tags.items() if k not in _VOLATILE_TAGS
            and not (k.startswith("final/") and (k.endswith("seconds") or "latency" in k))}  # wall times differ
    return {"status": r.info.status, "params": r.data.params, "tags": tags, "curves": curves,
            "layers": json.loads(layers)}


def test_a_run_through_the_relay_is_the_run_a_trial_writes_directly(uri, driver, torch_one_thread, tmp_path):
    cfg = from_flat(TINY)
    key = run_key(cfg)
    runs = {}
    for name, make in (("direct", tracking.TrialRun), ("relayed", relay.trial_run)):
        with driver.serve(scope(uri, "relayed", cfg)):
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

    with driver.serve(scope(uri, "relayed", cfg)):  # a later sweep
        again = relay.trial_run(uri, runstore.experiment_id(uri, "relayed"), sweep="s", cell="base",
                                flat=cfg.to_flat(), run_key=key).open()  # a FINISHED run_key: nothing to train
    assert again.skip == "finished" and again.other_id == runs["relayed"][0].run_id
    assert again.other_final["test_acc"] == runs["relayed"][1]["test_acc"]


def test_the_claim_names_the_trials_process_and_a_failure_ends_the_run(uri, driver):
    exp = runstore.experiment_id(uri, "claims")
    cfg, cfg2 = from_flat({**TINY, "seed": 1}), from_flat({**TINY, "seed": 2})
    driver.start(scope(uri, "claims", cfg, cfg2))
    other = tracking.TrialRun(uri, exp, sweep="s", cell="base", flat=cfg.to_flat(), run_key=run_key(cfg),
                              trial_id="t1", claim="elsewhere/4242/7").open()  # a live trial on another host
    c = MlflowClient(uri)
    assert c.get_run(other.run_id).data.tags["claimed_by"] == "elsewhere/4242/7"
    mine = relay.trial_run(uri, exp, sweep="s2", cell="base", flat=cfg.to_flat(), run_key=run_key(cfg)).open()
    assert mine.skip == "claimed" and mine.other_id == other.run_id and mine.run_id is None

    mlrun = relay.trial_run(uri, exp, sweep="s", cell="base", flat=cfg2.to_flat(), run_key=run_key(cfg2)).open()
    mlrun.log_step({"epoch": 1, "stage": "pre", "val_acc": 0.25})
    mlrun.fail(ValueError("diverged"))
    stored = c.get_run(mlrun.run_id)
    assert stored.info.status == "FAILED" and stored.data.tags["error"] == "ValueError: diverged"
    assert [(m.step, m.value) for m in c.get_metric_history(mlrun.run_id, "epoch/val_acc")] == [(1, 0.25)]
    with pytest.raises(tracking.TrackingError, match="no run open for this handle"):
        mlrun.write()  # ended: the relay holds no run for it any more


# ---- the relay as a capability: each attack on the real relay ----------------------------------------------
def test_the_token_is_in_a_private_file_never_in_the_workers_environment(driver, tmp_path):
    env = driver.env[relay.ADDRESS_ENV]
    token = relay._read_token(driver.token_file)
    assert len(token) == 64 and token not in env  # Ray writes the workers' environment to its logs
    assert json.loads(env)["address"].startswith("127.0.0.1:")
    assert stat.S_IMODE(os.stat(driver.token_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(driver.token_file)).st_mode) == 0o700
    leaky = tmp_path / "token"
    leaky.write_text(token)
    leaky.chmod(0o644)
    with pytest.raises(tracking.TrackingError, match="not this user's private file"):
        relay._read_token(str(leaky))  # a worker never uses a token others could have read
    os.symlink(driver.token_file, tmp_path / "link")
    with pytest.raises(OSError):
        relay._read_token(str(tmp_path / "link"))


def test_a_connection_without_the_token_is_refused_and_closed(uri, driver):
    driver.start(scope(uri, "token", from_flat({**TINY, "seed": 3})))
    sock, f, reply = raw(driver, token="guess")
    with sock, f:
        assert "without its token" in reply["error"]
        assert f.readline() == b""  # and the connection is closed
    assert runstore.search(uri, "token", "") == []  # no run was made


def test_a_request_cannot_name_the_store_or_experiment_and_opens_only_the_sweeps_run_keys(uri, driver, tmp_path):
    cfg, outside = from_flat({**TINY, "seed": 4}), from_flat({**TINY, "seed": 5})
    sc = scope(uri, "scoped", cfg)
    parent = sweep_run.open_parent(uri, sc.experiment_id, "s", {"preset": "tiny"})
    sc = dataclasses.replace(sc, parent_run_id=parent)
    driver.start(sc)
    sock, f, _ = raw(driver)
    evil = tmp_path / "evil" / "mlflow.db"
    with sock, f:
        spec = {"op": "open", "run_key": run_key(cfg), "flat": cfg.to_flat(), "claim": "h/1/1"}
        reply = ask(f, {**spec, "uri": f"sqlite:///{evil}", "experiment_id": "0"})
        assert "unknown field(s) ['experiment_id', 'uri']" in reply["error"] and not evil.parent.exists()
        reply = ask(f, {**spec, "run_key": run_key(outside), "flat": outside.to_flat()})
        assert "is not one of the trials of sweep 's'" in reply["error"]
        assert "may not set tag(s) ['run_key']" in ask(f, {**spec, "tags": {"run_key": "x"}})["error"]
        # the parent run is the driver's: a trial can neither name another nor set MLflow's nesting tag
        assert "unknown field(s) ['parent_run_id']" in ask(f, {**spec, "parent_run_id": "0" * 32})["error"]
        assert "may not set tag(s) ['mlflow.parentRunId']" in ask(
            f, {**spec, "tags": {"mlflow.parentRunId": "0" * 32}})["error"]
        opened = ask(f, spec)["ok"]
        assert f"opened by {relay.this_claim()} already" in ask(f, spec)["error"]  # at most once per claim
    stored = MlflowClient(uri).get_run(opened["run_id"])
    assert stored.info.experiment_id == sc.experiment_id and stored.data.tags["sweep"] == "s"
    assert stored.data.tags["claimed_by"] == relay.this_claim()  # the caller's process, not the request's 'h/1/1'
    assert stored.data.tags[runstore.PARENT_TAG] == parent  # a child of the sweep's run
    assert [r.data.tags["run_key"] for r in runstore.search(uri, "scoped", "") if r.info.run_id != parent] == [
        run_key(cfg)]
    assert not any(r.data.tags.get("run_key") == run_key(outside) for r in runstore.search(uri, "Default", ""))


_CALLER = """
import encodings.idna, json, os, socket, sys  # noqa: F401 - loaded before the user changes
if os.environ.get("CALLER_UID"):  # become another user (started as root: python itself is root's alone)
    os.setgid(int(os.environ["CALLER_UID"]))
    os.setuid(int(os.environ["CALLER_UID"]))
host, port = sys.argv[1].rsplit(":", 1)
with socket.create_connection((host, int(port)), timeout=60) as sock, sock.makefile("rwb") as f:
    for line in sys.argv[2:]:
        f.write(line.encode() + b"\\n")
        f.flush()
        print(f.readline().decode().strip())
"""


def another_process(r: relay.Relay, token: str, *requests: dict, user: int | None = None) -> list[dict]:
    """The replies to ``requests`` sent by another process that presents ``token``."""
    proc = subprocess.run([sys.executable, "-c", _CALLER, r.address, json.dumps({"token": token}),
                           *map(json.dumps, requests)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CALLER_UID": "" if user is None else str(user)})
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_only_the_caller_that_opened_a_run_writes_it(uri, driver):
    """Another process, even with the token and the handle, cannot finish a run it did not open (the
    forged 0.999 of a live sweep); nor can a guessed handle."""
    cfg = from_flat({**TINY, "seed": 6})
    driver.start(scope(uri, "owners", cfg))
    mine = relay.trial_run(uri, "ignored", sweep="s", cell="base", flat=cfg.to_flat(), run_key=run_key(cfg)).open()
    forged = {"op": "finish", "result": {"test_acc": 0.999, "epochs": 3, "collapsed_layers": [], "layer_density": {}}}
    hello, stolen = another_process(driver, relay._read_token(driver.token_file),
                                    {**forged, "handle": mine._handle, "claim": relay.this_claim()})
    assert hello == {"ok": {"idle_timeout_s": relay.IDLE_TIMEOUT_S}}
    assert "no run open for this handle and claim" in stolen["error"]
    sock, f, _ = raw(driver)
    with sock, f:
        assert "no run open for this handle and claim" in ask(f, {**forged, "handle": "0" * 32})["error"]
    assert MlflowClient(uri).get_run(mine.run_id).info.status == "RUNNING"
    with pytest.raises(tracking.TrackingError, match=r"result\['test_acc'\] must be"):
        mine._call("finish", result={**forged["result"], "test_acc": "0.999"})  # what a client's finish sends
    with pytest.raises(tracking.TrackingError, match="not inside the sweep's Tune storage"):
        driver.scope = dataclasses_replace(driver.scope, storage="/nonexistent/ray_results")
        mine.set_checkpoint_dir("/tmp/elsewhere")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_another_users_process_is_refused_even_with_the_token(driver):
    replies = another_process(driver, relay._read_token(driver.token_file), user=65534)  # nobody, token leaked
    assert replies == [{"error": "the relay serves this user's processes only"}]


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_export_takes_bytes_never_a_path(uri, driver, tmp_path):
    cfg = from_flat({**TINY, "seed": 7})
    driver.start(scope(uri, "export", cfg))
    mlrun = relay.trial_run(uri, "ignored", sweep="s", cell="base", flat=cfg.to_flat(), run_key=run_key(cfg)).open()
    with pytest.raises(tracking.TrackingError, match=r"unknown field\(s\) \['path'\]"):
        mlrun._call("export", path="/etc/passwd")  # what an attacker sent: a file the driver can read
    model = tmp_path / "model.safetensors"
    model.write_bytes(os.urandom(2 * relay.EXPORT_CHUNK + 5))  # three requests
    mlrun.log_export(str(model))
    got = MlflowClient(uri).download_artifacts(mlrun.run_id, tracking.EXPORT_ARTIFACT, str(tmp_path / "dl"))
    assert Path(got).read_bytes() == model.read_bytes()
    assert [a.path for a in MlflowClient(uri).list_artifacts(mlrun.run_id)] == [tracking.EXPORT_ARTIFACT]


def test_a_line_over_the_cap_is_refused_before_it_is_read_whole(driver):
    host, port = driver.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock:  # before the token: 4 KiB at most
        sock.sendall(b"x" * 65536)
        f = sock.makefile("rb")
        assert "over 4096 bytes" in json.loads(f.readline())["error"] and f.readline() == b""
    sock, f, _ = raw(driver)
    sent = []

    def flood():  # 400 MB without a newline, as the attack: the relay stops reading after MAX_LINE
        try:
            for _ in range(400):
                sock.sendall(b"y" * 2**20)
                sent.append(1)
        except OSError:
            pass

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    with sock, f:
        assert f"over {relay.MAX_LINE} bytes" in json.loads(f.readline())["error"]
        t.join(60)
    assert len(sent) < 100  # the relay closed the connection long before the 400 MB


def test_connections_are_capped_and_idle_ones_closed(uri, monkeypatch):
    r = make_driver(monkeypatch, max_connections=5, max_unauthenticated=2, hello_timeout_s=1.0, idle_timeout_s=2.0)
    try:
        host, port = r.address.rsplit(":", 1)
        silent = [socket.create_connection((host, int(port)), timeout=60) for _ in range(2)]
        time.sleep(0.2)
        with socket.create_connection((host, int(port)), timeout=60) as third:
            assert "waiting to present the relay's token" in third.makefile("rb").readline().decode()
        for s in silent:  # the hello timeout ends them
            assert s.makefile("rb").readline() == b""
            s.close()
        cfg = from_flat({**TINY, "seed": 8})
        r.start(scope(uri, "idle", cfg))
        authed = [raw(r) for _ in range(5)]
        with socket.create_connection((host, int(port)), timeout=60) as sixth:
            assert "at most 5 connections" in sixth.makefile("rb").readline().decode()
        mlrun = relay.trial_run(uri, "x", sweep="s", cell="base", flat=cfg.to_flat(), run_key=run_key(cfg))
        opener = threading.Thread(target=mlrun.open)  # a trial's link waits for a free slot
        opener.start()
        started = time.monotonic()
        for sock, f, reply in authed:
            assert reply["ok"] == {"idle_timeout_s": 2.0}
            assert f.readline() == b""  # idle: closed by the relay
            sock.close()
        assert time.monotonic() - started < 10
        opener.join(60)
        assert mlrun.run_id is not None and mlrun.skip is None
        time.sleep(2.5)  # longer than the relay's idle timeout: the link reconnects, the handle still works
        mlrun.log_step({"epoch": 1, "stage": "pre", "val_acc": 0.5})
        mlrun.write()
        assert MlflowClient(uri).get_metric_history(mlrun.run_id, "epoch/val_acc")[0].value == 0.5
    finally:
        r.close()


def test_without_the_relay_a_trial_writes_directly(monkeypatch):
    monkeypatch.delenv(relay.ADDRESS_ENV, raising=False)
    monkeypatch.setattr(relay, "_link", None)
    assert type(relay.trial_run("sqlite:///x.db", "0", sweep="s", cell="c", flat={}, run_key="k")) is tracking.TrialRun


def test_the_optuna_trial_set_is_its_search_space():
    """The relay's trial set of a search: the fixed values, each knob within its range, the run_key its own."""
    from sweeps import optuna_search

    flat = to_flat(from_flat({**TINY, "train.lr": 0.01}))
    fixed = {k: v for k, v in flat.items() if k != "train.lr"}
    trial = optuna_search.trial_set(fixed, ["train.lr"])
    assert trial(run_key(from_flat(flat)), flat) == (optuna_search.CELL, flat)
    for other in ({**flat, "train.lr": 5.0}, {**flat, "seed": 9}, {**flat, "model.width": 17}):  # out of range, not fixed
        assert trial(run_key(from_flat(other)), other) is None
    assert trial("0" * 12, flat) is None and trial(run_key(from_flat(flat)), {"no.such": 1}) is None


def test_a_results_effective_units_are_checked():
    ok = {"test_acc": 0.9, "epochs": 3, "collapsed_layers": [], "layer_density": {"a": 0.1},
          "effective_units": {"a": 7}}
    assert relay._result(dict(ok)) == ok
    for bad in ({"a": -1}, {"a": "7"}, {"a": True}, [7]):
        with pytest.raises(relay.Refused, match="effective_units"):
            relay._result({**ok, "effective_units": bad})


def test_a_runs_role_tag_is_the_one_its_sweep_gives_it():
    """The driver's scope decides a trial's role tag (designs.Trial.role): a trial that sends none gets it,
    one that sends another is refused, a trial without a role (an Optuna search's) may not set one."""
    from sweeps.relay_scope import check_open

    base = Trial("base", to_flat(from_flat({**TINY, "seed": 40})), "baseline")
    full = Trial("full", to_flat(from_flat({**TINY, "seed": 41})), "method")
    sc = relay.Scope.of("sqlite:///unused.db", "0", "s", [base, full])
    hello = {"op": "open", "claim": relay.this_claim(), "tags": {"git_commit": "abc"}}
    for t in (base, full):
        *_, tags, (cell, _) = check_open({**hello, "run_key": t.run_key, "flat": t.flat}, sc)
        assert tags == {"git_commit": "abc", "role": t.role} and cell == t.cell
        same = {**hello, "run_key": t.run_key, "flat": t.flat, "tags": {"role": t.role}}
        assert check_open(same, sc)[4] == {"role": t.role}
    with pytest.raises(relay.Refused, match="has role 'method' in sweep 's', not 'baseline'"):
        check_open({**hello, "run_key": full.run_key, "flat": full.flat, "tags": {"role": "baseline"}}, sc)
    search = relay.Scope("sqlite:///unused.db", "0", "s", lambda key, flat: ("optuna", flat))
    with pytest.raises(relay.Refused, match="has role None"):
        check_open({**hello, "run_key": base.run_key, "flat": base.flat, "tags": {"role": "baseline"}}, search)
