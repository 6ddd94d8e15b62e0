import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sparse_core import learned_mask
from sparse_core.config import MaskConfig, ModelConfig, PruneConfig
from sparse_core.init import initialise
from sparse_core.masks import prunable_weights, set_masks
from sparse_core.models import build
from sparse_core.pruners import ScoreInputs, score
from sparse_core.pruning import (DensityError, check_density, collapsed, erk_densities, masks_from_scores, schedule,
                                 shuffle, target_count)
from sparse_core.registry import PRUNERS, SCOPES


def _setup(seed=0, conv=False):
    if conv:
        model = build(ModelConfig(name="vgg16", width_mult=0.0625), (3, 16, 16), 10)
        shape = (3, 16, 16)
    else:
        model = build(ModelConfig(width=24, depth=3), (1, 8, 8), 10)
        shape = (1, 8, 8)
    initialise("kaiming", model, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(40, *shape, generator=g), torch.arange(40) % 10
    return model, ScoreInputs(x, y, shape, torch.Generator().manual_seed(seed + 2), PruneConfig())


def _with_learned_mask(model, name):
    if name == "mask":
        learned_mask.attach(model, MaskConfig(kind="sigmoid"))
        with torch.no_grad():
            for p in learned_mask.score_params(model):
                p.normal_(generator=torch.Generator().manual_seed(5))
    return model


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "vgg"])
@pytest.mark.parametrize("scope", SCOPES.names())
@pytest.mark.parametrize("pruner", PRUNERS.names())
def test_every_pruner_and_scope_hits_the_density_exactly_leaves_the_model_alone_and_is_deterministic(pruner, scope, conv):
    model, inputs = _setup(conv=conv)
    model = _with_learned_mask(model, pruner)
    model.train()
    before = copy.deepcopy(model.state_dict())
    scores = score(pruner, model, inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "scoring changed the model"
    assert model.training
    total = sum(w.numel() for w in prunable_weights(model).values())
    for density in (0.5, 0.05, 0.01):
        masks = masks_from_scores(scores, density, scope)
        assert sum(int(m.sum()) for m in masks.values()) == target_count(total, density)
        if scope == "layerwise":
            for n, m in masks.items():
                assert abs(int(m.sum()) - density * m.numel()) <= 1, n
    # same seed, same scores, same mask
    model2, inputs2 = _setup(conv=conv)
    model2 = _with_learned_mask(model2, pruner)
    masks2 = masks_from_scores(score(pruner, model2, inputs2), 0.05, scope)
    masks1 = masks_from_scores(scores, 0.05, scope)
    assert all(torch.equal(masks1[n], masks2[n]) for n in masks1)


def test_snip_equals_grad_times_weight_computed_independently():
    model, inputs = _setup()
    scores = score("snip", model, inputs)
    ref = copy.deepcopy(model).eval()
    weights = list(prunable_weights(ref).values())
    grads = torch.autograd.grad(F.cross_entropy(ref(inputs.x), inputs.y), weights)
    for (name, w), g in zip(prunable_weights(ref).items(), grads):
        assert torch.allclose(scores[name], (g * w).abs(), atol=1e-7), name


def test_synflow_equals_path_norm_gradient_on_a_tiny_net():
    # f(1) for a two-layer linear-ReLU net with |weights|: R = 1^T |W2| |W1| 1 (biases zero), so
    # dR/dW1[j,i] = sum_k |W2[k,j]| and dR/dW2[k,j] = sum_i |W1[j,i]|.
    model = build(ModelConfig(width=6, depth=1), (1, 2, 2), 3)
    initialise("kaiming", model, torch.Generator().manual_seed(3))
    w1, w2 = model.blocks[0].layer.weight.detach().clone(), model.head.weight.detach().clone()
    before = copy.deepcopy(model.state_dict())
    s = score("synflow", model, ScoreInputs(None, None, (1, 2, 2), torch.Generator(), PruneConfig()))
    exp1 = w2.abs().sum(0)[:, None].expand_as(w1) * w1.abs()
    exp2 = w1.abs().sum(1)[None, :].expand_as(w2) * w2.abs()
    assert torch.allclose(s["blocks.0.layer.weight"], exp1, atol=1e-5)
    assert torch.allclose(s["head.weight"], exp2, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # signs restored


def test_grasp_prunes_the_lowest_signed_hg_times_w():
    model, inputs = _setup()
    scores = score("grasp", model, inputs)
    # independent H g via double backprop at temperature T
    ref = copy.deepcopy(model).eval()
    weights = list(prunable_weights(ref).values())
    T = inputs.cfg.grasp_temperature
    g = [t.detach() for t in torch.autograd.grad(F.cross_entropy(ref(inputs.x) / T, inputs.y), weights)]
    grads = torch.autograd.grad(F.cross_entropy(ref(inputs.x) / T, inputs.y), weights, create_graph=True)
    hg = torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, g)), weights)
    for (name, w), h in zip(prunable_weights(ref).items(), hg):
        assert torch.allclose(scores[name], h * w, rtol=1e-4, atol=1e-12), name
    assert any((s < 0).any() for s in scores.values())  # signed, not absolute
    masks = masks_from_scores(scores, 0.5, "global")
    flat = torch.cat([scores[n].flatten() for n in scores])
    kept = torch.cat([masks[n].flatten() for n in masks])
    assert flat[kept].min() >= flat[~kept].max()  # the lowest (most negative) end is pruned


def test_global_scope_uses_one_threshold_and_breaks_ties_by_position():
    scores = {"a": torch.tensor([[5.0, 1.0], [3.0, 3.0]]), "b": torch.tensor([3.0, 0.0, 9.0])}
    masks = masks_from_scores(scores, 4 / 7, "global")
    assert masks["a"].tolist() == [[True, False], [True, True]] and masks["b"].tolist() == [False, False, True]


def test_erk_densities_follow_the_formula_and_total_is_exact():
    shapes = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "fc": (10, 32), "big": (256, 256)}
    numel = {n: math.prod(s) for n, s in shapes.items()}
    for density in (0.3, 0.05, 0.01):
        d = erk_densities(shapes, density)
        assert math.isclose(sum(d[n] * numel[n] for n in shapes), density * sum(numel.values()), rel_tol=1e-9)
        free = [n for n in shapes if d[n] < 1.0]
        ratios = {n: d[n] / (sum(shapes[n]) / numel[n]) for n in free}
        assert max(ratios.values()) == pytest.approx(min(ratios.values()))  # proportional where not capped
        scores = {n: torch.rand(s, generator=torch.Generator().manual_seed(0)) for n, s in shapes.items()}
        masks = masks_from_scores(scores, density, "erk")
        assert sum(int(m.sum()) for m in masks.values()) == target_count(sum(numel.values()), density)
        for n, m in masks.items():
            assert abs(int(m.sum()) - d[n] * numel[n]) <= 1
    capped = erk_densities(shapes, 0.3)
    assert capped["conv1"] == 1.0 and capped["big"] < 0.3  # small layers kept dense, re-solved for the rest


def test_iterative_schedule_and_previous_masks_stay_pruned():
    assert schedule(0.01, 2) == pytest.approx([0.1, 0.01])
    assert schedule(0.5, 1) == [0.5]
    g = torch.Generator().manual_seed(0)
    scores = {"w": torch.rand(100, generator=g)}
    first = masks_from_scores(scores, 0.5, "global")
    rescored = {"w": torch.rand(100, generator=g)}  # new scores would like other weights back
    second = masks_from_scores(rescored, 0.2, "global", previous=first)
    assert int(second["w"].sum()) == 20 and not (second["w"] & ~first["w"]).any()


def test_density_miss_is_an_error_and_collapse_is_flagged():
    masks = {"a": torch.tensor([True, False]), "b": torch.tensor([False, False])}
    with pytest.raises(DensityError):
        check_density(masks, 0.5)
    assert collapsed(masks) == ["b"]


def test_shuffle_keeps_per_layer_counts_and_moves_positions():
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(50, 40, generator=g) < 0.1, "b": torch.rand(30, generator=g) < 0.5}
    out = shuffle(masks, torch.Generator().manual_seed(1))
    for n in masks:
        assert int(out[n].sum()) == int(masks[n].sum()) and out[n].shape == masks[n].shape
    assert not torch.equal(out["a"], masks["a"])


def test_magnitude_pruning_keeps_the_largest_weights_with_masks_installed():
    model, inputs = _setup()
    masks = masks_from_scores(score("magnitude", model, inputs), 0.1, "global")
    allw = torch.cat([w.detach().abs().flatten() for w in prunable_weights(model).values()])
    kept = torch.cat([m.flatten() for m in masks.values()])
    assert allw[kept].min() >= allw[~kept].max()
    set_masks(model, masks)
    assert sum(int((w != 0).sum()) for w in prunable_weights(model).values()) == int(kept.sum())


def test_first_k_picks_what_a_stable_sort_puts_first_with_ties_infinities_signed_zeros_and_nan():
    from sparse_core.pruning import first_k

    g = torch.Generator().manual_seed(0)
    checked = 0
    for trial in range(600):
        n = int(torch.randint(1, 120, (1,), generator=g))
        values = torch.randint(-3, 4, (n,), generator=g).double()  # many ties
        values[torch.rand(n, generator=g) < 0.1] = math.inf
        values[torch.rand(n, generator=g) < 0.1] = -math.inf
        zeros = values == 0
        values[zeros] = torch.where(torch.rand(int(zeros.sum()), generator=g) < 0.5, -0.0, 0.0).double()
        if trial % 4 == 0:
            values[torch.rand(n, generator=g) < 0.05] = math.nan
        if trial % 2:
            values = values.float() + torch.randint(0, 2, (n,), generator=g) * 0.5
        for k in (-1, 0, 1, n // 3, n // 2, n - 1, n, n + 2):
            for largest in (True, False):
                expected = torch.zeros(n, dtype=torch.bool)
                if k > 0:
                    expected[torch.sort(values, descending=largest, stable=True).indices[:k]] = True
                assert torch.equal(first_k(values, k, largest), expected), (trial, k, largest)
                checked += 1
    assert checked == 600 * 16
