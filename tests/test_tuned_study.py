"""The tuned study's rules: a search reads validation accuracy only, every method gets the same budget,
the confirmatory seeds never include the search's seed."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import tuned_study  # noqa: E402


class _OnlyValidation(dict):
    def __getitem__(self, key):
        if key != "val_acc":
            raise AssertionError(f"the search objective read {key!r}")
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key]


def test_the_search_objective_reads_validation_accuracy_and_nothing_else():
    result = _OnlyValidation(val_acc=0.75, test_acc=0.99, best_val_acc=0.9, test_acc_at_best_val=0.9)
    assert tuned_study.objective(result) == 0.75


def test_every_method_searches_the_common_knobs_and_its_own():
    spaces = {m: tuned_study.space({**tuned_study.DIGITS, **flat}) for m, flat in tuned_study.METHODS.items()}
    assert all(set(tuned_study.COMMON) <= set(s) for s in spaces.values())
    assert set(spaces["pruner=snip"]) == set(tuned_study.COMMON)
    assert {"mask.lr", "mask.warmup"} <= set(spaces["base+mask"]) and "post.smoothing" in spaces["full"]
    assert {"rigl.alpha", "rigl.delta_t", "rigl.start_density"} <= set(spaces["rigl"])


def test_a_search_runs_its_budget_on_seed_0_and_the_confirmation_on_other_seeds(tmp_path, monkeypatch):
    monkeypatch.setitem(tuned_study.DIGITS, "train.pre_epochs", 1)
    monkeypatch.setitem(tuned_study.DIGITS, "train.post_epochs", 1)
    out = tuned_study.search(("pruner=random", 0.1, 3))
    assert out["trials"] == 3 and len(out["values"]) == 3 and out["best_val_acc"] == max(out["values"])
    assert set(out["best_settings"]) == set(tuned_study.COMMON)
    r = tuned_study.confirm(("pruner=random", 0.1, out["best_settings"], 2))
    assert r["config"]["seed"] == 2 and r["config"]["train.lr"] == pytest.approx(out["best_settings"]["train.lr"])
    with pytest.raises(SystemExit, match="must not include 0"):
        tuned_study.main(["--confirm-seeds", "0,1", "--out", str(tmp_path)])
