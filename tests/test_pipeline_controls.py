"""The trainer's controls that change what pruning leaves behind, checked through the real trainer.

``prune.rewind_epoch`` (kept weights back to their value after that pre-training epoch),
``prune.reinit`` (kept weights re-drawn from the init), ``init.sparse_scale`` (1/sqrt(layer
density) on weights that start sparse: pruning at init, RigL) and RigL's stop point
(``rigl.end_fraction``). Every expectation is computed independently of the code under test, and
each test fails if the control were ignored. The trainer's state comes from the ``checkpoint``
function of its log callback (the public way to see weights and masks between steps).
"""

from __future__ import annotations

import math

import pytest
import torch

from sparse_core.config import Config
from sparse_core.init import initialise
from sparse_core.masks import prunable_layers
from sparse_core.models import build
from sparse_core.pruning import masks_from_scores
from sparse_core.train import RunState, derive_seed, fit

SMALL = {"model.width": 32, "model.depth": 3, "train.post_epochs": 0}
pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny MLPs (tests/conftest.py)


def states_by_step(flat: dict) -> tuple[RunState, list[tuple[dict, dict]]]:
    """Run a trainer; return it and (metrics, full state) after every step of its plan."""
    seen = []
    trainer = RunState(Config().replace(**flat), lambda metrics, checkpoint: seen.append((metrics, checkpoint())))
    fit(trainer)
    return trainer, seen


def weight_names(state: dict) -> list[str]:
    return list(state["masks"])


# ---- rewinding --------------------------------------------------------------------------------------

def test_rewind_sets_kept_weights_to_their_value_after_the_rewind_epoch_and_masks_from_the_trained_ones():
    flat = {**SMALL, "train.pre_epochs": 3, "prune.rewind_epoch": 1, "prune.density": 0.2}
    _, seen = states_by_step(flat)
    pre = [state for metrics, state in seen if metrics["stage"] == "pre"]
    (pruned,) = [state for metrics, state in seen if metrics["stage"] == "prune"]
    after_epoch_1, trained = pre[0]["model"], pre[-1]["model"]
    names = weight_names(pruned)
    # The masks come from the trained weights (global magnitude), not from the rewound ones.
    expected = masks_from_scores({n: trained[n].abs() for n in names}, 0.2, "global")
    for n in names:
        mask = pruned["masks"][n]
        assert torch.equal(mask, expected[n]), n
        assert torch.equal(pruned["model"][n][mask], after_epoch_1[n][mask]), n  # bit for bit
        assert not torch.equal(after_epoch_1[n][mask], trained[n][mask]), n  # the rewind changed them
        assert torch.count_nonzero(pruned["model"][n][~mask]) == 0, n


def test_without_rewind_kept_weights_stay_trained():
    flat = {**SMALL, "train.pre_epochs": 3, "prune.density": 0.2}
    _, seen = states_by_step(flat)
    trained = [state for metrics, state in seen if metrics["stage"] == "pre"][-1]["model"]
    (pruned,) = [state for metrics, state in seen if metrics["stage"] == "prune"]
    for n in weight_names(pruned):
        mask = pruned["masks"][n]
        assert torch.equal(pruned["model"][n][mask], trained[n][mask]), n


# ---- re-initialisation --------------------------------------------------------------------------

def fresh_kaiming(trainer: RunState, stream: str) -> dict[str, torch.Tensor]:
    """An independent Kaiming init of the trainer's architecture from the generator named ``stream``."""
    cfg = trainer.cfg
    model = build(cfg.model, trainer.data.in_shape, trainer.data.num_classes)
    initialise("kaiming", model, torch.Generator().manual_seed(derive_seed(cfg.seed, stream)))
    return {n: layer.weight.detach().clone() for n, layer in prunable_layers(model).items()}


@pytest.mark.parametrize("sparse_scale", [True, False])
def test_reinit_redraws_kept_weights_from_the_init_and_keeps_the_trained_masks(sparse_scale):
    common = {**SMALL, "train.pre_epochs": 2, "prune.density": 0.2, "init.sparse_scale": sparse_scale}
    _, plain = states_by_step(common)
    trainer, seen = states_by_step({**common, "prune.reinit": True})
    (pruned,) = [state for metrics, state in seen if metrics["stage"] == "prune"]
    (kept_trained,) = [state for metrics, state in plain if metrics["stage"] == "prune"]
    fresh, original = fresh_kaiming(trainer, "reinit"), fresh_kaiming(trainer, "init")
    for n in weight_names(pruned):
        mask = pruned["masks"][n]
        assert torch.equal(mask, kept_trained["masks"][n]), n  # pre-training and scoring are untouched
        density = float(mask.float().mean())
        scale = 1 / math.sqrt(density) if sparse_scale else 1.0
        torch.testing.assert_close(pruned["model"][n][mask], fresh[n][mask] * scale, rtol=1e-6, atol=0)
        assert not torch.allclose(pruned["model"][n][mask], kept_trained["model"][n][mask]), n
        assert not torch.allclose(pruned["model"][n][mask], original[n][mask] * scale), n  # a new draw


# ---- sparse-aware init scaling ----------------------------------------------------------------------

def preactivation_std(trainer: RunState) -> list[float]:
    """Std of every prunable layer's output on 512 training inputs, in order."""
    out: list[float] = []
    model = trainer.model.eval()
    hooks = [layer.register_forward_hook(lambda m, i, o: out.append(float(o.std())))
             for layer in prunable_layers(model).values()]
    try:
        with torch.no_grad():
            model(trainer.data.x_train[:512])
    finally:
        for h in hooks:
            h.remove()
    return out


@pytest.mark.parametrize("method", ["prune", "rigl"], ids=["pruning-at-init", "rigl"])
def test_sparse_scale_keeps_the_dense_preactivation_std_and_off_it_vanishes(method):
    """Random sparsity at density 0.1 in a 5-layer MLP: with the scaling every layer's
    pre-activation std stays near the dense network's; without it, it shrinks ~sqrt(0.1) per layer.
    RigL scales its random start by 1/sqrt(layer density); pruning at init measures the factor that
    restores the dense init's std per layer (prune.rescale's data path), which for SynFlow, whose
    kept weights are the large ones, is far below 1/sqrt(density)."""
    at_init = {"train.pre_epochs": 0, "train.post_epochs": 0, "prune.pruner": "random", "train.method": method}
    dense = RunState(Config().replace(**at_init, **{"prune.density": 1.0}))
    fit(dense)
    reference = preactivation_std(dense)
    init_weights = {n: layer.weight.detach().clone() for n, layer in prunable_layers(dense.model).items()}
    ratios = {}
    for scale in (True, False):
        sparse = RunState(Config().replace(**at_init, **{"prune.density": 0.1, "init.sparse_scale": scale}))
        fit(sparse)
        ratios[scale] = [s / r for s, r in zip(preactivation_std(sparse), reference)]
        for n, mask in sparse.masks.items():  # the same init (same seed), kept weights x one factor per layer
            kept, init = sparse.model.get_parameter(n).detach()[mask], init_weights[n][mask]
            if not scale:
                factor = 1.0
            elif method == "rigl":  # RigL's random start: 1/sqrt(layer density)
                factor = 1 / math.sqrt(float(mask.float().mean()))
            else:  # pruning at init: the factor that restores the dense init's std on the scoring batch
                factor = float(kept[0] / init[0])
                assert factor > 1.5, (n, factor)  # ~1/sqrt(0.1) for random pruning
            torch.testing.assert_close(kept, init * factor)
    assert len(ratios[True]) == 6
    assert all(0.7 < r < 1.5 for r in ratios[True]), ratios[True]
    assert ratios[False][0] < 0.5 and ratios[False][-1] < 0.05, ratios[False]


# ---- RigL's stop point ----------------------------------------------------------------------------

def test_rigl_changes_masks_until_end_fraction_of_the_steps_and_never_after():
    # digits: 1,293 training samples / batch 64 = 21 steps an epoch; 4 epochs = 84 steps; updates every
    # 2 steps until 0.5 x 84 = 42, i.e. in epochs 1 and 2 only. Without the stop, the cosine drop
    # fraction climbs back to alpha after step 42 and the masks would keep changing.
    flat = {"model.width": 32, "model.depth": 3, "train.method": "rigl", "train.pre_epochs": 2,
            "train.post_epochs": 2, "prune.density": 0.2, "rigl.delta_t": 2, "rigl.end_fraction": 0.5}
    trainer, seen = states_by_step(flat)
    steps_per_epoch = math.ceil(trainer.data.x_train.shape[0] / 64)
    assert steps_per_epoch * 2 == int(0.5 * steps_per_epoch * 4)  # the stop falls at the end of epoch 2
    (start,) = [state["masks"] for metrics, state in seen if metrics["stage"] == "rigl_init"]
    epochs = [state["masks"] for metrics, state in seen if metrics["stage"] == "rigl"]
    assert len(epochs) == 4

    def same(a, b):
        return all(torch.equal(a[n], b[n]) for n in a)

    assert not same(start, epochs[0]) and not same(epochs[0], epochs[1])  # updates before the stop
    assert same(epochs[1], epochs[2]) and same(epochs[2], epochs[3])  # none after it
    for n, mask in start.items():  # per-layer counts never change
        assert all(int(e[n].sum()) == int(mask.sum()) for e in epochs), n
