"""Faults and bad input (issue 13), through the real parts: the real CLIs in subprocesses, a real
SQLite MLflow store, a real Ray runtime for the sweeps.

Default suite: checkpoints that are malicious, corrupt or truncated; claims on a run_key; an
unwritable ``--storage-path`` or ``--out``; a corrupt database. ``-m slow``: a driver killed with
SIGKILL and then re-run plainly or with ``--resume``, and two drivers started together on a new store.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runstore import EPOCH_PREFIX, typed_config, unwritable
from sparse_core.checkpoint import CheckpointError, load_state
from sweeps import claims, tracking

from sweep_cli import TIMED_MAIN

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 900  # subprocess time limit: the machine is shared and busy
TINY = ["model.width=8", "model.depth=1", "train.pre_epochs=1", "train.post_epochs=1", "prune.density=0.5"]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def main_error_line(main, argv, capsys) -> str:
    """The same contract for a CLI's main() called in this process (no interpreter start-up)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def sparse_core_main(argv):
    from sparse_core.cli import main

    return main(argv)


def analysis_main(argv):
    from analysis.cli import main

    return main(argv)


class Evil:
    """A pickle whose loading would create a file (any command could stand in its place)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint written by the CLI (digits, about a second)."""
    path = tmp_path_factory.mktemp("ckpt") / "state.pt"
    assert sparse_core_main([*TINY, "--checkpoint", str(path), "--quiet"]) == 0
    return path


# ---- 1, 2: checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("wrapped", [True, False], ids=["torch-save", "raw-pickle"])
def test_malicious_checkpoint_does_not_execute(tmp_path, wrapped, capsys):
    marker, evil = tmp_path / "PWNED", tmp_path / "evil.pt"
    if wrapped:
        torch.save({"format": 2, "step_idx": 0, "model": Evil(marker)}, evil)
    else:
        evil.write_bytes(__import__("pickle").dumps(Evil(marker)))
    before = evil.read_bytes()
    argv = [*TINY, "--checkpoint", str(evil)]
    line = (one_error_line(cli("sparse_core", *argv)) if wrapped  # the real command, once
            else main_error_line(sparse_core_main, argv, capsys))
    assert not marker.exists()  # nothing ran
    assert str(evil) in line and "not a checkpoint of sparse_core" in line and "delete it or pass another path" in line
    assert evil.read_bytes() == before  # never overwritten
    if wrapped:
        assert "system" in line  # names what it asked to import


@pytest.mark.parametrize("kind", ["random", "text", "truncated"])
def test_corrupt_checkpoint_one_line_exit_2_and_untouched(tmp_path, real_checkpoint, kind, capsys):
    bad = tmp_path / "c.pt"
    if kind == "random":
        bad.write_bytes(os.urandom(5000))
    elif kind == "text":
        bad.write_text("epoch 3: loss 0.1\n" * 50)
    else:
        data = real_checkpoint.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    before = bad.read_bytes()
    line = main_error_line(sparse_core_main, [*TINY, "--checkpoint", str(bad)], capsys)
    assert str(bad) in line and "not a checkpoint of sparse_core" in line and "delete it or pass another path" in line
    assert bad.read_bytes() == before


def test_real_checkpoint_loads_with_weights_only_and_resumes(tmp_path, real_checkpoint, capsys):
    state = load_state(real_checkpoint)  # weights_only=True: the allow-list covers the trainer's state
    assert state["step_idx"] > 0 and state["history"] and state["generators"]
    copy = tmp_path / "state.pt"
    copy.write_bytes(real_checkpoint.read_bytes())
    assert sparse_core_main([*TINY, "--checkpoint", str(copy)]) == 0
    assert f"resuming from {copy}" in capsys.readouterr().err


def _wrong(state: dict, kind: str) -> dict:
    """``state`` with wrong content of one kind (each unpickles safely)."""
    model = dict(state["model"])
    first = next(iter(model))
    return {
        "bare": {"format": state["format"], "step_idx": 0},  # the tag and step only
        "step_beyond_plan": {**state, "step_idx": 10**6},
        "other_run_key": {**state, "config": {**state["config"], "seed": 99}},
        "shape": {**state, "model": {**model, first: torch.zeros(3, 3)}},
        "missing_tensor": {**state, "model": {k: v for k, v in model.items() if k != first}},
        "float_mask": {**state, "masks": {k: m.float() for k, m in (state["masks"] or {first: None}).items()}},
        "type": {**state, "history": "everything"},
    }[kind]


@pytest.mark.parametrize("kind", ["bare", "step_beyond_plan", "other_run_key", "shape", "missing_tensor",
                                  "float_mask", "type"])
def test_wrong_content_checkpoint_one_line_exit_2_and_untouched(tmp_path, real_checkpoint, kind, capsys):
    """A state that unpickles safely but is not this run's: one line naming what is wrong, exit 2 (no
    traceback, no old metrics printed as the result), and the file left as it was."""
    bad = tmp_path / "state.pt"
    torch.save(_wrong(load_state(real_checkpoint), kind), bad)
    before = bad.read_bytes()
    line = main_error_line(sparse_core_main, [*TINY, "--checkpoint", str(bad)], capsys)
    assert str(bad) in line and "not a checkpoint of sparse_core" in line
    assert {"bare": "field 'config'", "step_beyond_plan": "step_idx 1000000 is outside", "other_run_key": "run_key",
            "shape": "model tensor", "missing_tensor": "missing", "float_mask": "bool mask",
            "type": "field 'history' must be list"}[kind] in line
    assert bad.read_bytes() == before
    assert capsys.readouterr().out == ""


def test_extra_fields_of_a_newer_state_are_tolerated(tmp_path, real_checkpoint):
    from sparse_core.config import from_flat, parse_overrides

    cfg = from_flat(parse_overrides(TINY))
    state = {**load_state(real_checkpoint), "mask_dual": {"lambda": torch.zeros(3)}}
    path = tmp_path / "state.pt"
    torch.save(state, path)
    assert load_state(path, cfg)["mask_dual"]["lambda"].shape == (3,)


def test_save_follows_no_link_planted_at_its_temporary_name(tmp_path, real_checkpoint, capsys):
    """``<checkpoint>.tmp`` (the old temporary name) and the checkpoint itself as links to a victim file:
    the victim is never written; the checkpoint becomes a regular file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = tmp_path / "state.pt"
    os.symlink(victim, str(path) + ".tmp")
    assert sparse_core_main([*TINY, "--checkpoint", str(path), "--quiet"]) == 0
    assert victim.read_text() == "precious" and path.is_file() and not path.is_symlink()
    from sparse_core.checkpoint import save_state

    other = tmp_path / "other.pt"
    os.symlink(victim, other)
    save_state(load_state(path), other)
    assert victim.read_text() == "precious" and not other.is_symlink() and load_state(other)["step_idx"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt", "state.pt", "state.pt.tmp", "victim.txt"]


def test_checkpoint_in_a_missing_directory_fails_before_training(tmp_path, capsys):
    line = main_error_line(sparse_core_main, [*TINY, "--checkpoint", str(tmp_path / "no" / "state.pt")], capsys)
    assert str(tmp_path / "no") in line


def test_trainable_resumes_from_the_newest_loadable_checkpoint(tmp_path, real_checkpoint):
    """Tune's pick (checkpoint_000001) is stale; the newest (000003) is damaged: 000002 is used. The
    files are ``state.pt``, the single-trial shape of earlier versions: still resumed. A run's own
    ``state_<run_key>.pt`` wins over a ``state.pt`` beside it; another run's file is never taken."""
    from ray import tune

    from sweeps.trial_sync import CHECKPOINT_FILE, copy_file, newest_state as _newest_state

    state = load_state(real_checkpoint)
    trial = tmp_path / "trial"
    for i, step in ((1, 1), (2, 7), (3, None)):
        d = trial / f"checkpoint_{i:06d}"
        d.mkdir(parents=True)
        if step is None:
            (d / CHECKPOINT_FILE).write_bytes(os.urandom(300))  # the crash hit its copy
        else:
            torch.save({**state, "step_idx": step}, d / CHECKPOINT_FILE)
        os.utime(d / CHECKPOINT_FILE, (1e9 + i, 1e9 + i))
    stale = tune.Checkpoint.from_directory(str(trial / "checkpoint_000001"))
    assert _newest_state(stale, None, "k1")["step_idx"] == 7
    assert _newest_state(None, str(trial), "k1")["step_idx"] == 7  # from the MLflow run's checkpoint_dir alone
    own = trial / "checkpoint_000002" / copy_file("k1")
    torch.save({**state, "step_idx": 5}, own)
    torch.save({**state, "step_idx": 6}, trial / "checkpoint_000002" / copy_file("k2"))
    assert _newest_state(stale, None, "k1")["step_idx"] == 5 and _newest_state(stale, None, "k2")["step_idx"] == 6
    own.unlink()
    (trial / "checkpoint_000002" / CHECKPOINT_FILE).write_text("not a checkpoint")
    (trial / "checkpoint_000001" / CHECKPOINT_FILE).write_text("not a checkpoint")
    (trial / "checkpoint_000002" / copy_file("k2")).unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        _newest_state(stale, None, "k1")  # never a silent start from scratch
    assert _newest_state(None, None, "k1") is None


# ---- 3, 4, 5, 8: one run per run_key (claims, without Ray) ------------------------------------------
FLAT = {"prune.density": 0.1, "seed": 0}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('claims')}/mlflow.db"
    with claims.store_lock(uri):
        exp = tracking.experiment_id(uri, "claims")
    return uri, exp


def trial_run(store, key, trial_id="t_00000", claim=None):
    uri, exp = store
    return tracking.TrialRun(uri, exp, sweep="s", cell="c", flat=FLAT, run_key=key, trial_id=trial_id, claim=claim)


def make_run(store, key, status, claimed_by=None, heartbeat=None, trial_id="old_00000"):
    uri, exp = store
    c = tracking.client(uri)
    tags = {"run_key": key, "trial_id": trial_id}
    tags.update({"claimed_by": claimed_by} if claimed_by else {})
    tags.update({"heartbeat": str(heartbeat)} if heartbeat is not None else {})
    run = c.create_run(exp, tags=tags)
    if status != "RUNNING":
        c.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield f"{socket.gethostname()}/{proc.pid}/{claims._proc_start(proc.pid)}"
    proc.kill(), proc.wait()


def dead_claim() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = claims._proc_start(proc.pid)
    proc.wait()
    return f"{socket.gethostname()}/{proc.pid}/{start}"


def test_finished_run_key_is_never_trained_again(store):
    done = make_run(store, "k_done", "FINISHED")
    orphan = make_run(store, "k_done", "RUNNING", trial_id="t_00000")  # a duplicate from an older version
    t = trial_run(store, "k_done").open()
    assert t.skip == "finished" and t.other.info.run_id == done and t.run_id is None
    c = tracking.client(store[0])
    assert len(c.search_runs([store[1]], "tags.run_key = 'k_done'")) == 2  # nothing new
    assert c.get_run(orphan).info.status == "KILLED" and c.get_run(orphan).data.tags["superseded_by"] == done


def test_live_claim_of_another_trial_wins(store, live_process):
    other = make_run(store, "k_live", "RUNNING", claimed_by=live_process)
    t = trial_run(store, "k_live").open()
    assert t.skip == "claimed" and t.other.info.run_id == other
    # another host: live while its heartbeat is fresh, an orphan once it is older than the lease
    fresh = make_run(store, "k_far", "RUNNING", claimed_by="elsewhere/1/1", heartbeat=time.time())
    assert trial_run(store, "k_far").open().skip == "claimed"
    tracking.client(store[0]).set_tag(fresh, "heartbeat", str(time.time() - claims.LEASE_S - 1))
    assert trial_run(store, "k_far").open().run_id == fresh


def test_orphans_are_continued_not_duplicated_and_retries_counted(store):
    c = tracking.client(store[0])
    older = make_run(store, "k_orphan", "RUNNING", claimed_by=dead_claim())
    newer = make_run(store, "k_orphan", "RUNNING")  # no claim at all (older versions): an orphan too
    c.set_tag(newer, "error", "WorkerCrashed: boom")
    t = trial_run(store, "k_orphan", trial_id="new_00000").open()
    assert t.skip is None and t.run_id == newer and t.reused
    run, old = c.get_run(newer), c.get_run(older)
    assert run.info.status == "RUNNING" and run.data.tags["retries"] == "1"
    assert run.data.tags["trial_id"] == "new_00000" and run.data.tags["claimed_by"] == claims.this_claim()
    assert run.data.tags["retried_after"] == "WorkerCrashed: boom" and "error" not in run.data.tags
    assert old.info.status == "KILLED" and old.data.tags["superseded_by"] == newer  # never left RUNNING
    t.resumed(2)
    c.set_terminated(newer, "KILLED")  # interrupted again; the next sweep continues the same run
    t2 = trial_run(store, "k_orphan", trial_id="third_00000").open()
    t2.resumed(3)
    tags = c.get_run(newer).data.tags
    assert t2.run_id == newer and tags["retries"] == "2" and tags["resumed_at_epoch"] == "2,3"
    assert len(c.search_runs([store[1]], "tags.run_key = 'k_orphan'")) == 2


def test_a_failed_run_is_continued_from_its_checkpoint_not_duplicated(store):
    """A re-run after a fault continues the run_key's FAILED run (one run per run_key), from the trial dir
    its run records, with the error kept as ``retried_after``."""
    c = tracking.client(store[0])
    failed = make_run(store, "k_failed", "FAILED", claimed_by=dead_claim())
    c.set_tag(failed, "error", "OSError: [Errno 28] No space left on device")
    c.set_tag(failed, "checkpoint_dir", "/trials/t7")
    t = trial_run(store, "k_failed", trial_id="rerun_00000").open()
    assert t.skip is None and t.run_id == failed and t.checkpoint_dir == "/trials/t7"
    run = c.get_run(failed)
    assert run.info.status == "RUNNING" and run.data.tags["retries"] == "1" and "error" not in run.data.tags
    assert run.data.tags["retried_after"].startswith("OSError: [Errno 28]")
    assert len(c.search_runs([store[1]], "tags.run_key = 'k_failed'")) == 1


def test_sweep_counts_come_from_the_store_not_tunes_view(store):
    """A pack that errored is "failed" for every copy in Tune's view; the sweep's counts are what the store
    holds: 2 trained (one of them retried after a failure), 1 failed, 1 skipped inside its trial, 1 never run."""
    from types import SimpleNamespace

    from sweeps.ablation_grid import _counts

    uri, exp = store
    c = tracking.client(uri)
    for key, statuses in (("n_done", ["FINISHED"]), ("n_retried", ["FAILED", "FINISHED"]), ("n_failed", ["FAILED"]),
                          ("n_idle", ["FINISHED"])):
        for status in statuses:
            make_run(store, key, status)
    todo = [SimpleNamespace(run_key=k) for k in ("n_done", "n_retried", "n_failed", "n_idle", "n_never")]
    tune_view = {"launched": 5, "failed": 5, "unfinished": 0, "idle_keys": {"n_idle": "finished"}}
    experiment = c.get_experiment(exp).name
    assert _counts(uri, experiment, todo, tune_view, skipped=3) == {"trained": 2, "skipped": 4, "failed": 1,
                                                                    "unfinished": 1}


@pytest.fixture
def live_claims_of(live_process):
    """Claims of 3 more live processes beside ``live_process``'s (each a different trial process)."""
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(3)]
    yield [live_process] + [f"{socket.gethostname()}/{p.pid}/{claims._proc_start(p.pid)}" for p in procs]
    for p in procs:
        p.kill(), p.wait()


@pytest.fixture
def no_lock(monkeypatch):
    """``TrialRun.open`` as on a tracking server: no lock, the store arbitrates (``claims.take``)."""
    @contextlib.contextmanager
    def unlocked(uri):
        yield False

    monkeypatch.setattr(tracking, "store_lock", unlocked)


def test_server_claim_the_creator_seen_by_the_other_wins(store, live_claims_of, no_lock, monkeypatch):
    """Two trials create a run for one run_key at once. A's search ran before B's run existed, so A
    saw only its own run; B's run sorts first (its client's clock is behind). "Oldest wins" let both
    train; with write-once claims B cannot take A's run, so A trains and B deletes its run."""
    a = trial_run(store, "k_race", "a_00000", claim=live_claims_of[0])
    a._create()
    assert a._arbitrate() and a.skip is None
    b = trial_run(store, "k_race", "b_00000", claim=live_claims_of[1])
    b._create()
    c = tracking.client(store[0])
    mine, theirs = c.get_run(b.run_id), c.get_run(a.run_id)
    monkeypatch.setattr(tracking, "runs_of_key", lambda *args: [mine, theirs])  # B's run first, as by its clock
    assert not b._arbitrate()
    assert b.skip == "claimed" and b.other.info.run_id == a.run_id and b.run_id is None
    assert c.get_run(mine.info.run_id).info.lifecycle_stage == "deleted"
    assert [r.info.run_id for r in c.search_runs([store[1]], "tags.run_key = 'k_race'")] == [a.run_id]
    params = c.get_run(a.run_id).data.params
    assert params["claim.1"].rsplit("@", 1)[0] == live_claims_of[0]
    assert typed_config(params)[1] == []  # a claim is no config key: the analysis reads past it silently


def test_server_claim_concurrent_opens_one_trains(store, live_claims_of, no_lock):
    """Four trials of one run_key open at the same moment (threads, no lock): one trains, three skip."""
    import threading

    barrier, got = threading.Barrier(4), {}

    def open_one(i):
        t = trial_run(store, "k_four", f"t{i}_00000", claim=live_claims_of[i])
        barrier.wait()
        got[i] = t.open()

    threads = [threading.Thread(target=open_one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(str(t.skip) for t in got.values()) == ["None", "claimed", "claimed", "claimed"]
    (winner,) = [t for t in got.values() if t.skip is None]
    runs = tracking.client(store[0]).search_runs([store[1]], "tags.run_key = 'k_four'")
    assert [r.info.run_id for r in runs] == [winner.run_id]  # the losers' runs are deleted
    assert all(t.other_id and t.run_id is None for t in got.values() if t.skip)  # lost to a run it could not take


def test_server_claim_two_trials_continue_one_orphan(store, live_claims_of, no_lock):
    """An interrupted run (KILLED), found by two trials at once: one takes its next generation and
    continues it, the other skips. Between taking it and setting it RUNNING, it already counts as live."""
    c = tracking.client(store[0])
    orphan_id = make_run(store, "k_cont", "KILLED", claimed_by=dead_claim())
    seen = c.get_run(orphan_id)  # what both read before either wrote
    a = trial_run(store, "k_cont", "a_00000", claim=live_claims_of[0])
    b = trial_run(store, "k_cont", "b_00000", claim=live_claims_of[1])
    assert a._take(seen) and not b._take(seen)
    assert b.skip == "claimed" and b.other_id == orphan_id
    taken = c.get_run(orphan_id)
    assert taken.info.status == "KILLED" and claims.claim_alive(taken)  # taken, not yet RUNNING
    assert trial_run(store, "k_cont", "c_00000", claim=live_claims_of[2]).open().skip == "claimed"
    a._reopen(taken, None)
    run = c.get_run(orphan_id)
    assert run.info.status == "RUNNING" and run.data.tags["claimed_by"] == live_claims_of[0]
    c.set_terminated(orphan_id, "KILLED")  # interrupted again: the next trial takes generation 2
    later = trial_run(store, "k_cont", "d_00000", claim=live_claims_of[3]).open()
    assert later.run_id == orphan_id and later.skip is None
    run = c.get_run(orphan_id)
    assert run.data.params["claim.2"].rsplit("@", 1)[0] == live_claims_of[3] and claims.claim_generation(run) == 2


def test_server_claim_on_another_host_lives_by_its_time(store):
    """A claim param of another host is live for ``LEASE_S`` after it was taken (its tags, heartbeat
    included, come after it); a KILLED run taken again after it ended counts as open meanwhile."""
    c = tracking.client(store[0])
    fresh, stale, retaken = (make_run(store, "k_host", status) for status in ("RUNNING", "RUNNING", "KILLED"))
    c.log_param(fresh, "claim.1", f"elsewhere/7/7@{time.time():.3f}")
    c.log_param(stale, "claim.1", f"elsewhere/7/7@{time.time() - claims.LEASE_S - 1:.3f}")
    c.log_param(retaken, "claim.1", f"elsewhere/7/7@{time.time() + 1:.3f}")
    assert [claims.claim_alive(c.get_run(r)) for r in (fresh, stale, retaken)] == [True, False, True]
    assert claims.current_claim(c.get_run(fresh))[0] == "elsewhere/7/7"


# ---- 6, 7: unwritable paths, corrupt database ----------------------------------------------------------
def test_unwritable_storage_path_fails_before_ray_and_store(tmp_path, capsys):
    from sweeps import optuna_search

    (tmp_path / "afile").write_text("x")
    db = tmp_path / "mlflow.db"
    argv = ["--preset", "smoke", "--mlflow-uri", f"sqlite:///{db}", "--storage-path", str(tmp_path / "afile" / "ray")]
    code = (f"import runpy, sys\nsys.argv[1:] = {argv!r}\ntry:\n"
            f"    runpy.run_path('sweeps/ablation_grid.py', run_name='__main__')\n"
            f"finally:\n    print('ray imported:', 'ray' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
    line = one_error_line(proc)
    assert "ray imported: False" in proc.stdout
    assert "--storage-path" in line and f"{tmp_path / 'afile'} is a file" in line, line
    line = main_error_line(optuna_search.main, argv, capsys)  # the other sweep script: the same pre-flight
    assert f"{tmp_path / 'afile'} is a file" in line
    assert not db.exists()  # no MLflow store was created


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_storage_path_without_write_permission(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert "no write permission" in unwritable(str(ro / "ray"))


def test_writable_paths_pass(tmp_path):
    assert unwritable(str(tmp_path / "a" / "b")) is None
    assert unwritable(str(tmp_path / "f.md"), directory=False) is None
    assert "is a directory" in unwritable(str(tmp_path), directory=False)


def test_analysis_corrupt_database_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(os.urandom(5000))
    line = main_error_line(analysis_main, ["table", "--experiment", "x", "--mlflow-uri", f"sqlite:///{bad}"], capsys)
    assert str(bad) in line and "not an SQLite database" in line
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    line = main_error_line(analysis_main, ["plot", "--experiment", "x", "--mlflow-uri", f"sqlite:///{other}"], capsys)
    assert "not MLflow's" in line


@pytest.mark.parametrize("command,out", [("table", "afile/t.md"), ("plot", "afile/plots"), ("report", "afile")])
def test_analysis_unwritable_out_before_loading(tmp_path, store, command, out, capsys):
    """The experiment does not exist: an error about --out proves the check comes before the loading."""
    (tmp_path / "afile").write_text("x")
    line = main_error_line(analysis_main, [command, "--experiment", "no-such-experiment", "--mlflow-uri", store[0],
                                           "--out", str(tmp_path / out)], capsys)
    assert "--out" in line and "is a file" in line, line


# ---- slow: a killed driver, two drivers at once ---------------------------------------------------------
def sweep_argv(tmp_path, cells="full,base,rigl", densities="0.1,0.05", *extra, uri=None):
    """The smoke sweep of these tests (1 + 4 epochs a trial), on ``uri`` (default: a new SQLite store in tmp_path)."""
    return [sys.executable, "sweeps/ablation_grid.py", "--preset", "smoke", "--cells", cells, "--densities", densities,
            "--set", "train.post_epochs=4", "--mlflow-uri", uri or f"sqlite:///{tmp_path}/mlflow.db",
            "--storage-path", str(tmp_path / "ray"), *extra]


def running_with_checkpoint(db: Path) -> list[tuple[str, str, str]]:
    """(run_id, checkpoint_dir, run_key) of RUNNING runs that have a checkpoint (plain SQL: cheap to poll)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
            return con.execute("SELECT r.run_uuid, t.value, k.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                               "JOIN tags k ON k.run_uuid = r.run_uuid WHERE r.status = 'RUNNING' "
                               "AND t.key = 'checkpoint_dir' AND k.key = 'run_key'").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []


def newest_epoch(trial_dir: str, key: str) -> int:  # of run_key's state.pt, or state_<run_key>.pt (packed trial)
    epochs = []
    for path in [p for d in Path(trial_dir).glob("checkpoint_*") for p in (d / f"state_{key}.pt", d / "state.pt")
                 if p.exists()]:
        try:
            epochs.append(len(load_state(path)["history"]))
        except CheckpointError:
            pass  # the kill hit this one mid-copy
    return max(epochs)


def assert_one_finished_run_per_key(uri: str, n_keys: int, experiment: str = "sparsity-sweep") -> list:
    all_runs = [r for r in tracking.search(uri, experiment) if "run_key" in r.data.tags]  # not the report's
    keys = [r.data.tags["run_key"] for r in all_runs]
    assert len(set(keys)) == n_keys and len(keys) == n_keys, sorted(keys)  # one run per run_key
    assert {r.info.status for r in all_runs} == {"FINISHED"}  # none RUNNING
    c = tracking.client(uri)
    for r in all_runs:  # no epoch logged twice, none missing
        key = EPOCH_PREFIX + "train_loss" if EPOCH_PREFIX + "train_loss" in r.data.metrics else "train_loss"
        steps = [m.step for m in c.get_metric_history(r.info.run_id, key)]
        assert steps == sorted(set(steps)) and steps == list(range(1, len(steps) + 1)), steps
        assert len(steps) == int(float(r.data.tags["final/epochs"])), steps  # a retry re-logs what never reached it
    return all_runs


def assert_rerun_continued(uri: str, n_keys: int, finished_before: dict, orphans: dict,
                           experiment: str = "sparsity-sweep", output: str = "") -> None:
    """After a killed driver's re-run: one FINISHED run per run_key, the runs FINISHED before the kill
    (run_id -> end_time) untouched, the orphans (run_id -> newest checkpoint's epoch) continued in the
    same run from that checkpoint. ``output``: the re-run's output, shown when an orphan was reopened more
    than once (a Tune-level retry of its trial says why there)."""
    all_runs = {r.info.run_id: r for r in assert_one_finished_run_per_key(uri, n_keys, experiment)}
    for run_id, end_time in finished_before.items():  # never re-run
        assert all_runs[run_id].info.end_time == end_time and "retries" not in all_runs[run_id].data.tags
    for run_id, epoch in orphans.items():  # continued in the same run, from the newest checkpoint
        tags = all_runs[run_id].data.tags
        assert tags["retries"] == "1" and tags["resumed_at_epoch"].split(",")[0] == str(epoch), \
            (tags, epoch, output[-6000:])


def assert_drivers_shared(procs, outs) -> None:
    """Two drivers of one sweep both succeeded, without a traceback, and between them trained each
    run_key once: the other's trials were skipped (claimed or FINISHED)."""
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
        driver_lines = [line for line in out.splitlines() if "pid=" not in line]  # not Ray's worker logs
        assert not any(line.startswith("Traceback") for line in driver_lines), out[-4000:]  # e.g. alembic's
    assert any("trained nothing" in out or "skipping" in out for out in outs), outs[0][-2000:] + outs[1][-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("rerun", ["plain", "resume", "resume-torn"])
def test_driver_killed_then_rerun(tmp_path, rerun):
    """SIGKILL on the driver's process group mid-trial, then a plain re-run or --resume: one FINISHED
    run per run_key, none RUNNING; a FINISHED trial is not re-run; orphans continue from their newest
    checkpoint with retries=1. "resume-torn": the kill came after Tune wrote its experiment state and
    before its search state (seen in CI: Tune then resumed one trial with an empty config), so
    --resume re-runs the sweep instead, with a note."""
    argv, db = sweep_argv(tmp_path), tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + LIMIT_S
    while not running_with_checkpoint(db) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    time.sleep(2)  # Ray's processes share the driver's fate
    orphans = {run_id: newest_epoch(where, key) for run_id, where, key in running_with_checkpoint(db)}
    assert orphans, "the kill should have left a RUNNING run (the bug this test guards against)"
    finished_before = {r.info.run_id: r.info.end_time for r in tracking.search(uri, "sparsity-sweep",
                                                                               "attributes.status = 'FINISHED'")}
    if rerun == "resume-torn":
        searcher = list((tmp_path / "ray").glob("*/basic-variant-state-*.json"))
        assert searcher, "Tune should have saved its search state by now"
        for path in searcher:
            path.unlink()
    done = subprocess.run(argv + (["--resume"] if rerun.startswith("resume") else []), cwd=ROOT,
                          capture_output=True, text=True, timeout=LIMIT_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert ("its search state was never written" in done.stdout) == (rerun == "resume-torn"), done.stdout[-4000:]
    assert_rerun_continued(uri, 6, finished_before, orphans, output=done.stdout + done.stderr)


@pytest.mark.slow
def test_two_drivers_on_a_new_store(tmp_path):
    """Started together on a file that does not exist yet: the schema is created once and each
    run_key is run by one of them."""
    argv = sweep_argv(tmp_path, "base,rigl", "0.1,0.05")
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=LIMIT_S)[0] for p in procs]
    assert_drivers_shared(procs, outs)
    assert_one_finished_run_per_key(f"sqlite:///{tmp_path}/mlflow.db", 4)


# ---- start-up failures: one line, exit 2, in seconds, before Ray ----------------------------------------
_STARTUP = TIMED_MAIN.format(module="ablation_grid")


def _store_file(tmp_path: Path, kind: str) -> str:
    """A SQLite URI whose file is damaged in one way (or a folder, or in a folder nobody may write)."""
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    if kind == "corrupt":
        db.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    elif kind == "random":
        db.write_bytes(os.urandom(5000))
    elif kind == "truncated":
        uri = f"sqlite:///{tmp_path}/full.db"
        exp = tracking.experiment_id(uri, "x")
        c = tracking.client(uri)
        for _ in range(30):
            c.log_metric(c.create_run(exp).info.run_id, "m", 1.0)
        data = (tmp_path / "full.db").read_bytes()
        db.write_bytes(data[: len(data) // 3])
    elif kind == "directory":
        db.mkdir()
    elif kind == "read-only":
        if os.geteuid() == 0:  # root writes anywhere chmod allows nothing: a folder no one can create files in
            return "sqlite:////proc/mlflow.db"
        db.parent.chmod(0o555)
    return f"sqlite:///{db}"


STARTUP_CASES = {  # id: (extra argv, a store kind or None, what the one line says)
    "corrupt-db": ([], "corrupt", "is damaged (DatabaseError"),
    "truncated-db": ([], "truncated", "is damaged ("),
    "not-a-database": ([], "random", "is not an SQLite database"),
    "read-only-store": ([], "read-only", "writable"),
    "store-is-a-directory": ([], "directory", "is a directory"),
    "cpus-1e9": (["--cpus-per-trial", "1e9"], None, "a trial cannot get more CPUs than exist"),
    "empty-experiment": (["--experiment", ""], None, "--experiment '' (0 characters)"),
    "huge-experiment": (["--experiment", "e" * 5000], None, "(5000 characters)"),
    "gpus-without-gpu": (["--gpus-per-trial", "GPUS"], None, "--gpus-per-trial"),
    "name-with-path": (["--name", "../../x"], None, "--name '../../x'"),
    "pre-epochs-1e12": (["--set", "train.pre_epochs=1000000000000"], None, "train.pre_epochs=1000000000000 is not valid"),
    "width-1e9": (["--set", "model.width=1000000000"], None, "model.width=1000000000 is not valid"),
    "depth-1e6": (["--set", "model.depth=1000000"], None, "model.depth=1000000 is not valid"),
    "too-big-for-memory": (["--set", "model.width=60000", "--set", "model.depth=1000"], None, "does not fit"),
    "density-1e-300": (["--densities", "1e-300"], None, "keeps no weight"),
}


@pytest.mark.parametrize("case", list(STARTUP_CASES))
def test_startup_failure_is_one_line_exit_2_before_ray(tmp_path, case):
    extra, store, message = STARTUP_CASES[case]
    from sweeps import options

    gpus = "1" if options.local_gpus() == 0 else "1000"  # more than this machine has, either way
    uri = _store_file(tmp_path, store) if store else f"sqlite:///{tmp_path}/new/mlflow.db"
    if not store:
        (tmp_path / "new").mkdir()
    storage = tmp_path / "a" / "b" / "ray"
    argv = ["--preset", "smoke", "--cells", "base", "--densities", "0.1", "--no-report", "--mlflow-uri", uri,
            "--storage-path", str(storage), *[a.replace("GPUS", gpus) for a in extra]]
    proc = subprocess.run([sys.executable, "-c", _STARTUP, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=LIMIT_S)
    *lines, result = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-3000:]
    assert "ray_imported=False" in result and "code=2" in result, result
    assert float(result.split("seconds=")[1].split()[0]) < 5
    assert not storage.exists() and not (tmp_path / "x").exists()  # no Tune run, inside or outside storage
    if not store:
        assert not (tmp_path / "new" / "mlflow.db").exists()  # no store made


def test_cli_bounds_one_line_exit_2(capsys):
    for argv, message in ((["--threads", "100000"], "--threads 100000: must be in [1, "),
                          (["train.post_epochs=1000000000000"], "train.post_epochs=1000000000000 is not valid"),
                          (["prune.density=1e-300"], "keeps no weight"),
                          (["model.width=60000", "model.depth=1000"], "does not fit")):
        assert message in main_error_line(sparse_core_main, [*TINY, *argv], capsys)


# ---- the report's run is never left RUNNING -----------------------------------------------------------
_KILLED_REPORT = """
import os, signal, sys
from mlflow import MlflowClient
from analysis import report

def die(self, *args, **kwargs):  # the kill lands while the report's files are being logged
    os.kill(os.getpid(), signal.SIGKILL)

MlflowClient.log_artifacts = die
report.build(sys.argv[1], ["report"], sys.argv[2])
"""


def test_a_report_killed_midway_leaves_no_run_running(tmp_path, monkeypatch, torch_one_thread):
    from mlflow import MlflowClient

    from analysis import report
    from sparse_core.config import from_flat, parse_overrides, run_key
    from sparse_core.train import run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.experiment_id(uri, "report")
    for seed in (0, 1):
        cfg = from_flat({**parse_overrides(TINY), "seed": seed})
        mlrun = tracking.TrialRun(uri, exp, sweep="s", cell="base", flat=cfg.to_flat(), run_key=run_key(cfg)).open()
        mlrun.finish(run(cfg, lambda metrics, _: mlrun.log_step(metrics)))
    proc = subprocess.run([sys.executable, "-c", _KILLED_REPORT, uri, str(tmp_path / "r1")], cwd=ROOT,
                          capture_output=True, text=True, timeout=LIMIT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    c = tracking.client(uri)
    reports = lambda status: c.search_runs([exp], f"tags.cell = 'analysis' and attributes.status = '{status}'")  # noqa: E731
    assert len(reports("RUNNING")) == 1  # what a killed report leaves behind

    def interrupted(self, *args, **kwargs):  # Ctrl-C while the files are logged
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "log_artifacts", interrupted)
        with pytest.raises(KeyboardInterrupt):
            report.build(uri, ["report"], str(tmp_path / "r2"))
    assert reports("RUNNING") == [] and len(reports("KILLED")) == 2  # the stale run closed; the interrupted one too
    assert report.build(uri, ["report"], str(tmp_path / "r3"))["run_id"] in [r.info.run_id for r in reports("FINISHED")]
    assert reports("RUNNING") == [] and len(reports("FINISHED")) == 1


# ---- a full disk mid-sweep --------------------------------------------------------------------------------
def _small_disk(folder: Path, kib: int) -> None:
    """A ``kib`` KiB tmpfs at ``folder`` (root only), or the test is skipped."""
    folder.mkdir(exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts for a real full disk")


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["injected", "storage-tmpfs", "store-tmpfs"])
def test_a_full_disk_stops_the_sweep_in_one_line_and_the_rerun_completes(tmp_path, disk):
    """A full disk mid-sweep: every checkpoint write from each trial process's second on fails with ENOSPC
    (fault injection, ``SWEEPS_FAULT_ENOSPC_AT``), or the Tune storage, or the MLflow store, is on a real
    filesystem that fills up. The sweep stops at the first failure, saying so in one line, without
    retries or tracebacks, and leaves no run RUNNING (unless the store's own disk is full: nothing can be
    written there, and the re-run continues those runs); once there is space the plain re-run finishes
    every run_key, one run each."""
    argv = sweep_argv(tmp_path, "base,rigl", "0.1,0.05", "--no-report")
    uri, full_dir = f"sqlite:///{tmp_path}/mlflow.db", None
    if disk == "storage-tmpfs":
        full_dir = tmp_path / "ray"
        _small_disk(full_dir, 120)
    elif disk == "store-tmpfs":  # MLflow's schema (~930 KiB) and ~200 KiB to spare
        seed = f"sqlite:///{tmp_path}/seed.db"
        tracking.experiment_id(seed, "sparsity-sweep")
        full_dir = tmp_path / "store"
        _small_disk(full_dir, (tmp_path / "seed.db").stat().st_size // 1024 + 200)
        with sqlite3.connect(tmp_path / "seed.db") as src, sqlite3.connect(full_dir / "mlflow.db") as dst:
            src.backup(dst)  # the whole database, its write-ahead log included
        uri = f"sqlite:///{full_dir}/mlflow.db"
        argv = [uri if a.startswith("sqlite:") else a for a in argv]
    try:
        _full_then_rerun(argv, uri, disk, full_dir)
    finally:
        if full_dir is not None:
            subprocess.run(["umount", "-l", str(full_dir)], capture_output=True)  # -l: the store may be open here


def _full_then_rerun(argv, uri: str, disk: str, full_dir: Path | None) -> None:
    from sweeps.trial_sync import FAULT_ENOSPC_ENV

    fault = {FAULT_ENOSPC_ENV: "2"} if disk == "injected" else {}
    full = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S, env={**os.environ, **fault})
    said = [line for line in (full.stdout + full.stderr).splitlines() if line.startswith("error: the disk is full")]
    assert full.returncode == 1 and len(said) == 1, full.stdout + full.stderr
    assert "Traceback" not in full.stderr and len(full.stderr.splitlines()) < 20, full.stderr[-3000:]
    assert "retry" not in full.stdout  # no retry of a trial that a full disk would fail again
    if disk != "store-tmpfs":
        assert "RUNNING" not in {r.info.status for r in tracking.search(uri, "sparsity-sweep")}
    if full_dir is not None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(full_dir)], check=True)  # space freed
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    if disk == "injected":  # (a real disk may fill after some runs finished: those are skipped then)
        assert "4 trials (4 launched, 4 trained, 0 skipped, 0 failed)" in again.stdout
    assert_one_finished_run_per_key(uri, 4)  # the FAILED runs continued, none added
