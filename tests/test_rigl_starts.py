"""RigL's starts: a pruner's mask at init (exactly the mask pruning at init keeps), and the GraNet-style
gradual start that prunes to the target over the drop/grow updates."""

from __future__ import annotations

import pytest
import torch

from sparse_core.config import Config, RiglConfig
from sparse_core.masks import count
from sparse_core.rigl import RigL
from sparse_core.train import RunState, fit, run

FAST = {"train.pre_epochs": 0, "train.post_epochs": 4, "train.latency_rounds": 0, "prune.density": 0.05}


def _cfg(**kw) -> Config:
    return Config().replace(**{**FAST, **kw})


def test_gradual_schedule_is_cubic_over_the_updates_and_ends_exactly_at_the_target():
    r = RigL(RiglConfig(delta_t=10, start_density=0.3), total_steps=100, density=0.01)
    assert r.updates == [10, 20, 30, 40, 50, 60, 70]  # before T_end = 75
    assert r.density_at(5) == pytest.approx(0.3)  # before the first update
    assert r.density_at(10) == pytest.approx(0.01 + 0.29 * (1 - 1 / 7) ** 3)
    assert r.density_at(70) == pytest.approx(0.01) and r.density_at(99) == pytest.approx(0.01)
    steps = [r.density_at(s) for s in r.updates]
    assert all(a > b for a, b in zip(steps, steps[1:]))
    assert RigL(RiglConfig(), 100, 0.01).density_at(50) == 0.01  # no gradual start: the target throughout


def test_a_gradual_start_without_updates_is_refused():
    with pytest.raises(ValueError, match="rigl.start_density=0.3 needs drop/grow updates"):
        RigL(RiglConfig(delta_t=100, start_density=0.3), total_steps=50, density=0.01)


@pytest.mark.parametrize("pruner", ["synflow", "snip", "magnitude"])
def test_a_pruner_start_is_the_mask_pruning_at_init_keeps(pruner):
    flat = {"prune.pruner": pruner, "prune.rounds": 3 if pruner == "synflow" else 1}
    rigl = RunState(_cfg(**{"train.method": "rigl", "rigl.start": pruner, "prune.rounds": flat["prune.rounds"]}))
    rigl.rigl_init()
    at_init = RunState(_cfg(**flat))
    for step in at_init.plan[:flat["prune.rounds"]]:
        at_init.prune(step)
    assert rigl.masks.keys() == at_init.masks.keys()
    for name in rigl.masks:
        assert torch.equal(rigl.masks[name].cpu(), at_init.masks[name].cpu()), name


def test_the_gradual_start_trains_from_denser_to_exactly_the_target():
    cfg = _cfg(**{"train.method": "rigl", "rigl.start_density": 0.3, "rigl.delta_t": 5, "train.post_epochs": 3})
    seen = []
    t = RunState(cfg, lambda m, c: seen.append(m))
    result = fit(t)
    start = [m for m in seen if m["stage"] == "rigl_init"][0]
    assert start["density"] == pytest.approx(0.3, abs=1e-3)
    kept, total = count(t.masks)
    assert abs(kept - round(0.05 * total)) <= len(t.masks) and result["density"] == kept / total
    densities = [m["density"] for m in seen if m["stage"] == "rigl"]
    assert densities[0] < 0.3 and all(a >= b for a, b in zip(densities, densities[1:]))
    for name, w in ((n, l.weight) for n, l in t.model.named_modules() if hasattr(l, "weight_mask")
                    and l.weight_mask is not None):
        assert torch.all(w[~t.masks[f"{name}.weight"]] == 0)


def test_rigl_start_names_are_checked_against_the_pruners():
    with pytest.raises(ValueError, match="rigl.start='mask' is not valid; choose one of random, .*synflow"):
        run(_cfg(**{"train.method": "rigl", "rigl.start": "mask"}))


def test_nan_scores_of_kept_weights_still_give_the_exact_count():
    """Diverged weights (NaN) mid-epoch must not raise a DensityError; the epoch's end reports the divergence."""
    from sparse_core.pruning import masks_from_scores

    scores = {"a": torch.tensor([float("nan"), 1.0, float("nan"), 2.0, float("inf"), float("nan")])}
    previous = {"a": torch.tensor([True, True, True, True, False, False])}
    masks = masks_from_scores(scores, 3 / 6, "global", previous=previous)
    assert masks["a"].tolist() == [True, True, False, True, False, False]  # 1.0, 2.0, then the first NaN
    infinite = {"a": torch.tensor([float("inf"), float("nan"), 1.0, float("-inf")])}
    assert masks_from_scores(infinite, 0.5, "global", {"a": torch.tensor([True, True, False, True])})["a"].tolist() \
        == [True, True, False, False]  # inf first, then the NaN of a kept weight before the pruned one
