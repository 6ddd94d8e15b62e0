"""Packed trials (``--pack``: sweeps/packing.py, sweeps/trainable.py, sweeps/trial_sync.py) through the real parts: a real
Ray runtime, a real SQLite MLflow store, the smoke preset.

The packed sweep is the session's smoke sweep (``conftest.smoke_sweep``: 36 trials packed by default
into 7 Tune trials); an unpacked sweep and a retried pack are compared with it run_key by
run_key. A FINISHED copy inside a pack is tested in-process; ``-m slow`` adds a superset of seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import runstore
from sparse_core.config import FIELD_TYPES, from_flat, run_key, to_flat
from sweep_cli import grid_args, run_cli, runs
from sweeps import ablation_grid, designs, options, packing, presets

SMOKE = presets.get("smoke")
SMOKE_TRIALS = len(designs.cells("leave-one-out")) * len(SMOKE.densities)
# Values that differ between two runs of one config: wall time and measured latency.
UNSTABLE = ("seconds", "latency_")


def by_key(uri: str, experiment: str) -> dict:
    return {r.data.tags["run_key"]: r for r in runs(uri, experiment, "FINISHED")}


def smoke_trials(cells, densities=SMOKE.densities, seeds=(0,)):
    base = options.base_overrides(SMOKE.base, [], None)
    return designs.trials("leave-one-out", base, densities, seeds, SMOKE.synflow_rounds, list(cells),
                          SMOKE.cell_overrides)[0]


def stable_finals(run) -> dict:
    return {k: v for k, v in run.data.tags.items() if k.startswith("final/") and not any(u in k for u in UNSTABLE)}


def sweep(store, experiment, *extra) -> tuple[int, str]:
    return run_cli(ablation_grid.main, grid_args(store, experiment, "--no-report", *extra))


# ---- forming packs (no Ray) ------------------------------------------------------------------------
def test_packs_are_even_and_hold_one_cell_and_pack_key():
    from sparse_core.packed import pack_key

    trials = smoke_trials(["full", "rigl", "gmp"], densities=(0.1, 0.05, 0.01), seeds=range(10))  # 30 per cell
    packs = packing.packs(trials, 8)
    assert [len(p) for p in packs] == [8, 8, 7, 7] * 3
    for p in packs:
        assert len({t.cell for t in p}) == 1 and len({pack_key(from_flat(t.flat)) for t in p}) == 1
    assert sorted(t.run_key for p in packs for t in p) == sorted(t.run_key for t in trials)
    assert packing.packs(trials, 1) == [[t] for t in trials]  # --pack 1: every trial alone, in order
    assert [len(p) for p in packing.packs(trials, None)] == [15, 15] * 3  # the default for the MLP: 16


def test_cells_with_one_pre_training_share_a_trial_per_seed():
    """base, pruner=snip and base+soft_skip pre-train alike at every density: one group per seed, a cell's
    copies together; full (its sigmoid mask is steered to the density) and rigl (no pre-training)
    group by cell, across seeds."""
    cells = ["base", "pruner=snip", "base+soft_skip", "full", "rigl"]
    trials = smoke_trials(cells, densities=(0.1, 0.05), seeds=(0, 1))  # 4 per cell
    packs = packing.packs(trials, 8)
    shapes = sorted((tuple(sorted({t.cell for t in p})), tuple(sorted({t.seed for t in p}))) for p in packs)
    trio = ("base", "base+soft_skip", "pruner=snip")
    assert shapes == [(trio, (0,)), (trio, (1,)), (("full",), (0, 1)), (("rigl",), (0, 1))], shapes
    for p in packs:  # a cell's copies next to each other (one pack inside the trial)
        order = [t.cell for t in p]
        assert all(order.index(c) + order.count(c) - 1 == len(order) - 1 - order[::-1].index(c) for c in order)
    assert sorted(t.run_key for p in packs for t in p) == sorted(t.run_key for t in trials)


def test_cells_with_one_pre_training_per_density_share_a_trial_per_seed():
    """full and its post-pruning ablations steer a sigmoid mask to the density: one pre-training per
    density and seed, so where a cell alone cannot fill a pack a seed's cells go together (a cell's
    copies next to each other) and each Tune trial trains one pre-training per density for its cells;
    base+mask and full-no_zero_init (Kaiming init) are another such family; a family of one cell
    (full-no_mask here, whose pre-training is density-free) packs by cell."""
    from sparse_core import prefix

    family = ["full", "full-no_label_smoothing", "full-no_soft_skip"]
    trials = smoke_trials(family + ["base+mask", "full-no_zero_init", "full-no_mask"], seeds=(0, 1))
    packs = packing.packs(trials, 8)
    shapes = sorted((tuple(sorted({t.cell for t in p})), tuple(sorted({t.seed for t in p}))) for p in packs)
    kaiming = ("base+mask", "full-no_zero_init")
    assert shapes == [(kaiming, (0,)), (kaiming, (1,)), (tuple(family), (0,)), (tuple(family), (1,)),
                      (("full-no_mask",), (0, 1))], shapes
    for p in (p for p in packs if p[0].cell != "full-no_mask"):
        # inside a family's trial: one pre-training per density (and seed), shared by every cell there
        cfgs = [from_flat(t.flat) for t in p]
        assert len({prefix.prefix_key(c) for c in cfgs}) == len({(c.prune.density, c.seed) for c in cfgs}), \
            [t.cell for t in p]
    # where a cell alone fills its packs (8 trials, k = 8), it packs by cell as before: full copies of
    # one cell stack, and no pre-training is shared
    many = smoke_trials(family, seeds=range(4))
    assert sorted(tuple({t.cell for t in p}) for p in packing.packs(many, 8)) == [(c,) for c in sorted(family)]
    assert sorted(len({t.cell for t in p}) for p in packing.packs(many, 16)) == [3, 3, 3, 3]  # 8 < 16: per seed
    # a small cell whose family's other cells fill their own packs has nobody to share with: by cell
    mixed = smoke_trials(["full"], seeds=range(4)) + smoke_trials(["full-no_soft_skip"], seeds=(0, 1))
    assert sorted((p[0].cell, len(p)) for p in packing.packs(mixed, 8)) == [("full", 8), ("full-no_soft_skip", 4)]


def test_fewer_packs_than_slots_are_split():
    trials = smoke_trials(["full", "rigl"])  # 2 cells x 2 densities
    assert [len(p) for p in packing.packs(trials, 8)] == [2, 2]
    assert sorted(len(p) for p in packing.packs(trials, 8, min_packs=3)) == [1, 1, 2]
    assert [len(p) for p in packing.packs(trials, 8, min_packs=10)] == [1, 1, 1, 1]
    assert packing.default_pack("mlp") == packing.DEFAULT_PACK and packing.default_pack("vgg16") == 1


def test_pack_labels_and_one_config_shape():
    trials = smoke_trials(["full"])
    meta = {"sweep": "s"}
    one = {"trials": [packing.spec(trials[0])], "meta": meta}
    pack = {"trials": [packing.spec(t) for t in trials], "meta": meta}
    space = packing.param_space([[t] for t in trials], meta)  # --pack 1: every Tune trial a pack of one
    assert space["trials"]["grid_search"] == [[packing.spec(t)] for t in trials] and space["meta"] == meta
    assert packing.param_space([trials], meta)["trials"]["grid_search"] == [pack["trials"]]
    assert packing.specs(one) == one["trials"] and packing.label(one) == "full d=0.1 s=0"
    earlier = {"trial": packing.spec(trials[0]), "meta": meta}  # a Tune run saved by an earlier version
    assert packing.specs(earlier) == one["trials"]
    assert packing.label(pack) == "full d=0.1,0.01 s=0 (pack of 2)"
    assert packing.describe([[t] for t in trials], 2) == "2 trials"
    assert packing.describe([trials], 2) == "2 trials in 1 packed trials of up to 2"


@pytest.mark.parametrize("value,message", [("0", "--pack 0: give at least 1"), ("-3", "--pack -3: give at least 1"),
                                           ("two", "invalid int value")])
def test_bad_pack_fails_before_anything_starts(value, message, capsys):
    with pytest.raises(SystemExit) as e:
        parser, args = ablation_grid.parse_args(["--preset", "smoke", "--pack", value])
        ablation_grid.plan(parser, args)
    assert e.value.code == 2 and message in capsys.readouterr().err


# ---- packed sweeps ----------------------------------------------------------------------------------
def test_packed_sweep_equals_unpacked_run_by_run(smoke_sweep, sweep_store):
    out, uri = smoke_sweep["out"], sweep_store["uri"]
    assert smoke_sweep["code"] == 0, out
    # 9 cells (base, its three tricks, the four other pruners, gmp: its pre-training is base's in this
    # preset) share one pre-training: 18 trials in 2 packs of 9 (the default pack of 16); base+zero_init
    # and full-no_mask another: 1 pack of 4; full and its three post-pruning ablations share one per density
    # (their sigmoid mask is steered to it): 1 pack of 8; base+mask and full-no_zero_init likewise: 1 pack of
    # 4; rigl: 1 of 2
    assert f"launching {SMOKE_TRIALS} trials in 6 packed trials of up to 9" in out
    assert f"| {SMOKE_TRIALS} runs in 6 packed trials |" in out
    assert out.count("  done ") == SMOKE_TRIALS  # a line per run
    assert all(f"(pack of {k}, " in out for k in (2, 4, 8, 9)), out
    # base and pruner=snip trained in a trial that shared their pre-training, full in one that shared
    # its pre-training per density; rigl has none
    cells = ["full", "rigl", "base", "pruner=snip"]
    code, plain_out = sweep(sweep_store, "unpacked", "--cells", ",".join(cells), "--densities", "0.1", "--pack", "1")
    assert code == 0 and "launching 4 trials (1 CPU" in plain_out and "packed trials" not in plain_out, plain_out
    packed, plain = by_key(uri, "smoke"), by_key(uri, "unpacked")
    assert set(plain) == {t.run_key for t in smoke_trials(cells, densities=(0.1,))} and set(plain) < set(packed)
    c = runstore.client(uri)
    for key, run in plain.items():
        twin = packed[key]
        assert to_flat(from_flat(twin.data.params)) == to_flat(from_flat(run.data.params))
        assert stable_finals(twin) == stable_finals(run)  # the same run, packed or not
        for metric in ("epoch/val_acc", "epoch/train_loss", "trainer/lr", "prune/val_acc"):
            if metric == "prune/val_acc" and run.data.tags["cell"] == "rigl":
                continue
            hist = [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, metric)]
            assert hist and hist == [(m.step, m.value) for m in c.get_metric_history(twin.info.run_id, metric)]
        assert "pack_size" not in run.data.tags and "pretraining_shared_by" not in run.data.tags
        # packed, base and snip were in Tune trials of 9 copies with one pre-training, full in one of 8
        # with one per density (4 cells each); rigl shared none
        shared = twin.data.tags.get("pretraining_shared_by")
        expected = {"base": "9", "pruner=snip": "9", "full": "4"}.get(run.data.tags["cell"])
        assert shared == expected, (run.data.tags, shared)
    trial_ids = []
    for key, run in packed.items():
        tags = run.data.tags
        if tags.get("pack_size") is None:  # runs other tests of the session added to the experiment
            continue
        assert set(run.data.params) == set(FIELD_TYPES) and run_key(from_flat(run.data.params)) == key
        assert tags["pack_size"] in ("2", "4", "8", "9")
        assert [a.path for a in c.list_artifacts(run.info.run_id)] == ["layer_density.json"]
        # its checkpoints went to the pack's trial dir, recorded in its run, and were deleted when the pack
        # finished (resume never trains a finished run again; a copy's own state file: test_packing.py below)
        trial_dir = Path(tags["checkpoint_dir"])
        assert trial_dir.is_dir() and trial_dir.is_relative_to(Path(sweep_store["storage"]))
        assert not list(trial_dir.glob("checkpoint_*"))
        trial_ids.append((tags["trial_id"], tags["pack_size"]))
    assert len(trial_ids) == SMOKE_TRIALS and all(trial_ids.count((t, k)) == int(k) for t, k in trial_ids)


def test_failed_pack_retries_each_copy_from_its_checkpoint(smoke_sweep, sweep_store):
    uri = sweep_store["uri"]
    code, out = sweep(sweep_store, "retry-pack", "--cells", "base", "--pack", "2", "--max-concurrent", "1",
                      "--set", "train.fail_at_epoch=2")
    assert code == 0, out
    assert "retry base d=0.1,0.01 s=0 (pack of 2): failed, continuing from its last checkpoint" in out
    assert "2 trials (2 launched, 2 trained, 0 skipped, 0 failed) | 2 runs in 1 packed trials" in out
    retried, plain = by_key(uri, "retry-pack"), by_key(uri, "smoke")
    assert len(retried) == 2 == len(runs(uri, "retry-pack"))  # one run per copy, continued
    c = runstore.client(uri)
    for key, run in retried.items():
        tags = run.data.tags
        assert tags["resumed_at_epoch"] == "1" and tags["retries"] == "1"  # after epoch 1, not from scratch
        assert "InjectedFailure" in tags["retried_after"] and "error" not in tags
        for metric in ("epoch/test_acc", "epoch/train_loss"):
            assert [m.step for m in c.get_metric_history(run.info.run_id, metric)] == [1, 2, 3]
        assert stable_finals(run) == stable_finals(plain[key])  # the same result as never interrupted


@pytest.mark.slow
def test_superset_of_seeds_packs_only_the_new_trials(ray_runtime, sweep_store):
    uri = sweep_store["uri"]
    args = ("--cells", "rigl", "--pack", "2", "--max-concurrent", "1")
    code, out = sweep(sweep_store, "superset", *args)
    assert code == 0 and "launching 2 trials in 1 packed trials of up to 2" in out, out
    before = {r.info.run_id for r in runs(uri, "superset")}
    code, out = sweep(sweep_store, "superset", *args, "--seeds", "0,1")
    assert code == 0, out
    assert "skipping 2 of 4 trials: already FINISHED" in out and "launching 2 trials in 1 packed trials" in out
    assert "4 trials (2 launched, 2 trained, 2 skipped, 0 failed) | 2 runs in 1 packed trials" in out
    assert "2/2 seeds" in out, out[-1500:]  # the summary counts runs per (cell, density), packed or not
    after = runs(uri, "superset")
    assert len(after) == 4 and {r.info.status for r in after} == {"FINISHED"}
    new = [r for r in after if r.info.run_id not in before]
    assert {r.data.params["seed"] for r in new} == {"1"} and {r.info.run_id for r in after} >= before


# ---- a FINISHED copy inside a pack (in-process: Tune's session calls stand in) -------------------------
class _FakeTune:
    """What a trial calls of ``ray.tune``: reports are kept, checkpoints list their files."""

    def __init__(self):
        self.reports: list[tuple[dict, list[str] | None]] = []

    def report(self, metrics, checkpoint=None):
        self.reports.append((metrics, checkpoint))

    def get_checkpoint(self):
        return None

    def get_context(self):
        return type("Context", (), {"get_trial_id": staticmethod(lambda: "fake_00000")})()

    class Checkpoint:
        def __new__(cls, path, filesystem=None):  # a checkpoint dir that newest_state opens: Tune's own
            from ray import tune

            return tune.Checkpoint(path, filesystem=filesystem)

        @staticmethod
        def from_directory(d):
            return sorted(p.name for p in Path(d).iterdir())


def test_a_finished_copy_is_skipped_inside_its_pack(monkeypatch, sweep_store, torch_one_thread):
    """The driver's skip can be overtaken (another sweep finishes a run_key first, --resume): the copy
    whose run_key is FINISHED skips itself and the others train."""
    from sweeps import claims, tracking, trainable, trial_sync

    store = sweep_store
    done, new = smoke_trials(["base"], densities=(0.1, 0.05))
    with claims.store_lock(store["uri"]):
        exp_id = tracking.experiment_id(store["uri"], "inner-skip")
    finished = tracking.TrialRun(store["uri"], exp_id, sweep="earlier", cell="base", flat=done.flat,
                                 run_key=done.run_key).open()
    runstore.client(store["uri"]).set_terminated(finished.run_id, "FINISHED")
    fake = _FakeTune()
    monkeypatch.setattr(trainable, "tune", fake)
    monkeypatch.setattr(trial_sync, "tune", fake)
    meta = {"sweep": "inner-skip", "tracking_uri": store["uri"], "experiment_id": exp_id, "cpus": 1}
    trainable.train_trial({"trials": [packing.spec(done), packing.spec(new)], "meta": meta})
    final = fake.reports[-1][0]
    rows = {row["run_key"]: row for row in json.loads(final["runs"])}
    assert rows[done.run_key]["status"] == "skipped" and rows[done.run_key]["skipped"] == "finished"
    assert rows[done.run_key]["mlflow_run_id"] == finished.run_id
    assert rows[new.run_key]["status"] == "finished" and final["finished_copies"] == 1 == final["skipped_copies"]
    all_runs = runs(store["uri"], "inner-skip")
    assert len(all_runs) == 2 and {r.info.status for r in all_runs} == {"FINISHED"}
    assert {r.data.tags["sweep"] for r in all_runs} == {"earlier", "inner-skip"}  # the FINISHED run untouched
    # every checkpoint holds the trained copy's own file only (the skipped copy has no state)
    saved = [files for _, files in fake.reports if files is not None]
    assert saved and all(files == [f"state_{new.run_key}.pt"] for files in saved)


class _TuneWithCheckpoint(_FakeTune):
    """Tune's session for a retried pack: ``get_checkpoint`` is a real checkpoint dir of the pack."""

    def __init__(self, checkpoint):
        super().__init__()
        self.checkpoint = checkpoint

    def get_checkpoint(self):
        return self.checkpoint


def _first_epoch_state(cfg) -> dict:
    from sparse_core.train import run

    saved = {}
    run(cfg, lambda metrics, checkpoint: saved.setdefault("state", checkpoint()) if checkpoint else None)
    return saved["state"]


def test_a_wrong_content_state_fails_its_copy_alone(monkeypatch, sweep_store, tmp_path, torch_one_thread):
    """A retried pack of 4 whose checkpoint holds a good state for 3 copies and, for one, a state that
    unpickles safely but is not a trainer state of its run: that copy's run ends FAILED with one line
    naming the problem; the other 3 continue from their own states and finish."""
    import torch
    from ray import tune as real_tune

    from sweeps import claims, tracking, trainable, trial_sync
    from sweeps.trial_sync import copy_file

    trials = smoke_trials(["base"], densities=(0.1, 0.05, 0.02, 0.01))
    with claims.store_lock(sweep_store["uri"]):
        exp_id = tracking.experiment_id(sweep_store["uri"], "wrong-state")
    folder = tmp_path / "trial" / "checkpoint_000000"
    folder.mkdir(parents=True)
    bad = trials[1]
    for t in trials:
        state = _first_epoch_state(from_flat(t.flat))
        torch.save({"format": state["format"], "step_idx": 0} if t is bad else state, folder / copy_file(t.run_key))
    fake = _TuneWithCheckpoint(real_tune.Checkpoint.from_directory(str(folder)))
    monkeypatch.setattr(trainable, "tune", fake)
    monkeypatch.setattr(trial_sync, "tune", fake)
    meta = {"sweep": "wrong-state", "tracking_uri": sweep_store["uri"], "experiment_id": exp_id, "cpus": 1}
    trainable.train_trial({"trials": [packing.spec(t) for t in trials], "meta": meta})
    rows = {row["run_key"]: row for row in json.loads(fake.reports[-1][0]["runs"])}
    assert rows[bad.run_key]["status"] == "failed" and "field 'config'" in rows[bad.run_key]["error"]
    assert [rows[t.run_key]["status"] for t in trials if t is not bad] == ["finished"] * 3
    stored = {r.data.tags["run_key"]: r for r in runs(sweep_store["uri"], "wrong-state")}
    assert len(stored) == 4 and stored[bad.run_key].info.status == "FAILED"
    assert "\n" not in stored[bad.run_key].data.tags["error"] and "not a checkpoint" in stored[bad.run_key].data.tags["error"]
    good = [stored[t.run_key] for t in trials if t is not bad]
    assert {r.info.status for r in good} == {"FINISHED"} and all(r.data.tags.get("resumed_at_epoch") for r in good)


def test_a_pack_of_one_resumes_a_single_trial_checkpoint(monkeypatch, sweep_store, tmp_path, torch_one_thread):
    """A Tune trial is a pack of one (``--pack 1``, every Optuna trial): retried from a checkpoint of the
    single-trial shape of earlier versions (``state.pt``), it continues from that state, writes its own
    ``state_<run_key>.pt`` from then on, and its last report's accuracies are its run's (what a searcher
    optimises: the pack's mean of one copy)."""
    import torch
    from ray import tune as real_tune

    from sweeps import claims, tracking, trainable, trial_sync
    from sweeps.trial_sync import CHECKPOINT_FILE, copy_file

    (trial,) = smoke_trials(["base"], densities=(0.1,))
    with claims.store_lock(sweep_store["uri"]):
        exp_id = tracking.experiment_id(sweep_store["uri"], "old-shape")
    folder = tmp_path / "trial" / "checkpoint_000000"
    folder.mkdir(parents=True)
    torch.save(_first_epoch_state(from_flat(trial.flat)), folder / CHECKPOINT_FILE)
    fake = _TuneWithCheckpoint(real_tune.Checkpoint.from_directory(str(folder)))
    monkeypatch.setattr(trainable, "tune", fake)
    monkeypatch.setattr(trial_sync, "tune", fake)
    meta = {"sweep": "old-shape", "tracking_uri": sweep_store["uri"], "experiment_id": exp_id, "cpus": 1}
    trainable.train_trial({"trials": [packing.spec(trial)], "meta": meta})
    final = fake.reports[-1][0]
    (row,) = json.loads(final["runs"])
    (run,) = runs(sweep_store["uri"], "old-shape")
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_epoch"] == "1"
    assert "pack_size" not in run.data.tags  # a pack of one's run is tagged as a single trial's
    assert row["status"] == "finished" and final["finished_copies"] == 1
    assert final["val_acc"] == row["val_acc"] == float(run.data.tags["final/val_acc"])
    assert final["test_acc"] == row["test_acc"] == float(run.data.tags["final/test_acc"])
    saved = [files for _, files in fake.reports if files is not None]
    assert saved and all(files == [copy_file(trial.run_key)] for files in saved)
    epochs = [m.step for m in runstore.client(sweep_store["uri"]).get_metric_history(run.info.run_id, "epoch/val_acc")]
    # every epoch once: the resumed epoch 1, trained before the checkpoint and missing from this fresh run, is
    # logged from the checkpoint's history (RunLog.restore), not trained again (resumed_at_epoch above)
    assert epochs == list(range(1, final["epochs"] + 1))
