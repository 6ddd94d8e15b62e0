"""The learned masks against closed forms (the rescale at init, the keep probabilities, the augmented
Lagrangian's value and gradient, the direction and size of the dual step, the schedules, the clamps), and
by behaviour: on digits the mask is steered to the requested density and is what pruning keeps."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_core import learned_mask
from sparse_core.config import Config, MaskConfig
from sparse_core.learned_mask import HC_GAMMA, HC_TEMPERATURE, HC_ZETA
from sparse_core.masks import count
from sparse_core.train import RunState, fit, run

SYN = {"data.name": "synthetic", "data.synthetic_train": 256, "data.synthetic_test": 64, "model.width": 16,
       "model.depth": 2, "train.batch_size": 64, "train.latency_rounds": 0}
STEERED = ("sigmoid", "hardconcrete")


def _cfg(**kw) -> Config:
    return Config().replace(**{**SYN, **kw})


@pytest.mark.parametrize("s0", [0.0, -1.5, 2.0])
def test_sigmoid_mask_is_rescaled_to_start_at_exactly_one_where_the_sigmoid_is_steep(s0):
    cfg = MaskConfig(kind="sigmoid", init=s0)
    model = RunState(_cfg()).model
    learned_mask.attach(model, cfg)  # no generator: every score exactly s0
    learned_mask.set_beta(model, 1.0)
    values = torch.cat([v.flatten() for v in learned_mask.values(model).values()])
    assert torch.allclose(values, torch.ones_like(values), atol=1e-6)
    probs = torch.cat([p.flatten() for p in learned_mask.keep_probs(model).values()])
    assert torch.allclose(probs, torch.full_like(probs, 1 / (1 + math.exp(-s0))))
    assert learned_mask.start_density(cfg) == pytest.approx(1 / (1 + math.exp(-s0)))


@pytest.mark.parametrize("kind", STEERED)
def test_a_run_jitters_its_scores_from_its_own_mask_generator(kind):
    """Ties broken: N(start, 0.01^2) (log_alpha units for hard-concrete), the same for the same seed."""
    cfg = _cfg(**{"mask.kind": kind, "prune.pruner": "mask"})
    scores = [torch.cat([p.detach().flatten() for p in learned_mask.score_params(RunState(c).model)])
              for c in (cfg, cfg, cfg.replace(seed=1))]
    assert torch.equal(scores[0], scores[1]) and not torch.equal(scores[0], scores[2])
    mk = learned_mask.get(cfg.mask)
    centre = float(mk.init_score(torch.zeros(1))[0])
    assert float((scores[0] - centre).std()) == pytest.approx(mk.jitter, rel=0.05)
    assert float((scores[0] - centre).mean()) == pytest.approx(0.0, abs=mk.jitter / 10)


def test_hard_concrete_gate_closed_forms():
    kind = learned_mask.get(MaskConfig(kind="hardconcrete"))
    log_alpha = torch.tensor([[-3.0, 0.0, 1.0, 3.0]])
    score = log_alpha / learned_mask.HC_SCORE_SCALE
    det = (torch.sigmoid(log_alpha) * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0, 1)
    assert torch.allclose(kind.value(score, 1.0), det, atol=1e-6)
    p = torch.sigmoid(log_alpha - HC_TEMPERATURE * math.log(-HC_GAMMA / HC_ZETA))
    assert torch.allclose(kind.keep_prob(score, 1.0), p, atol=1e-6)
    # a sampled gate is the stretched, clamped concrete sample of its noise
    u = torch.tensor([[0.2, 0.5, 0.7, 0.999]])
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / HC_TEMPERATURE)
    assert torch.allclose(kind.forward_mask(score, 1.0, u), (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0, 1),
                          atol=1e-6)
    # the gates start open: deterministic gate 1 at the initial log_alpha
    init = kind.init_score(torch.zeros(3))
    assert torch.equal(kind.value(init, 1.0), torch.ones(3))
    # the keep probability over many draws is P(z != 0)
    g = torch.Generator().manual_seed(0)
    draws = kind.forward_mask(score.expand(20000, 4), 1.0, torch.rand(20000, 4, generator=g))
    assert torch.allclose((draws > 0).float().mean(0), p[0], atol=0.015)


def test_augmented_lagrangian_value_and_gradient_match_the_closed_form():
    kind = learned_mask.get(MaskConfig(kind="sigmoid"))
    score = torch.tensor([[0.3, -0.2, 0.01, -0.5, 0.8, -0.05], [0.1, 0.2, -0.3, -0.4, -0.6, 0.7]],
                         dtype=torch.float64, requires_grad=True)
    beta, rho = 3.0, 50.0
    targets = torch.tensor([0.4, 0.25], dtype=torch.float64)
    dual = torch.tensor([2.0, -1.0], dtype=torch.float64)
    penalty, hard = learned_mask.penalties([(kind, score, beta)], targets, dual, rho)
    p = torch.sigmoid(beta * score.detach())
    h = (p > 0.5).double().mean(1)
    assert torch.equal(hard, h)
    gap = h - targets  # the value is the hard density's
    assert torch.allclose(penalty, dual * gap + rho / 2 * gap ** 2 / targets)
    penalty.sum().backward()
    # the gradient is the expected density's: (lambda + rho (h - t) / t) * beta p (1 - p) / n
    coeff = (dual + rho * gap / targets).unsqueeze(1)
    assert torch.allclose(score.grad, coeff * beta * p * (1 - p) / score.shape[1])


def test_dual_ascent_raises_the_multiplier_above_the_target_and_lowers_it_below():
    dual = torch.tensor([1.0, 1.0, 1.0])
    learned_mask.dual_ascent(dual, torch.tensor([0.02, 0.01, 0.005]), torch.tensor([0.01, 0.01, 0.01]), 0.5)
    assert dual.tolist() == pytest.approx([1.5, 1.0, 0.75])  # lambda += lr (d - t) / t


def test_target_falls_geometrically_from_the_initial_expected_density_and_is_then_held():
    cfg = MaskConfig(kind="sigmoid", warmup=0.5)  # starts at p = 0.5
    total = 100
    assert learned_mask.target_at(0, total, 0.01, cfg) == pytest.approx(0.5)
    assert learned_mask.target_at(25, total, 0.01, cfg) == pytest.approx(math.sqrt(0.5 * 0.01))
    assert all(learned_mask.target_at(s, total, 0.01, cfg) == pytest.approx(0.01) for s in (50, 77, 100))
    targets = [learned_mask.target_at(s, total, 0.01, cfg) for s in range(51)]
    assert all(a > b for a, b in zip(targets, targets[1:]))
    # a density above the mask's start is the target from the first step
    assert learned_mask.target_at(0, total, 0.9, cfg) == pytest.approx(0.9)


def test_beta_rises_geometrically_over_the_pre_training_steps():
    cfg = MaskConfig(kind="sigmoid", beta_final=200.0)
    assert learned_mask.beta_at(0, 101, cfg) == 1.0 and learned_mask.beta_at(100, 101, cfg) == pytest.approx(200.0)
    assert learned_mask.beta_at(50, 101, cfg) == pytest.approx(math.sqrt(200.0))


@pytest.mark.parametrize("kind", STEERED)
def test_scores_are_clamped_where_the_density_term_can_still_move_them(kind):
    mk = learned_mask.get(MaskConfig(kind=kind))
    score = torch.tensor([-100.0, -0.001, 0.0, 0.001, 100.0])
    mk.after_step(score, 200.0)
    p = mk.keep_prob(score, 200.0)
    assert p.max() < 0.999 and p.min() > 0 and p.min() < 3e-4
    # with density control each copy's floor is its own: 5 % of its target density
    stacked = torch.full((2, 4), -100.0)
    floor = torch.tensor([0.05 * 0.1, 0.05 * 0.003])
    mk.after_step(stacked, 200.0, floor)
    assert torch.allclose(mk.keep_prob(stacked, 200.0).min(1).values, floor, rtol=1e-3)


def test_mask_stats_closed_form_on_a_hand_set_mask():
    model = RunState(_cfg(**{"mask.kind": "sigmoid", "prune.pruner": "mask"})).model
    learned_mask.set_beta(model, 1.0)
    layers = [l for l in model.modules() if getattr(l, "mask_score", None) is not None]
    probs = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.mask_score.copy_(torch.linspace(-4, 2 + i, layer.mask_score.numel()).view_as(layer.mask_score))
            probs.append(torch.sigmoid(layer.mask_score.flatten().double()).float().double())  # as computed
    zero = {n: torch.zeros_like(w, dtype=torch.bool) for n, w in learned_mask.keep_probs(model).items()}
    stats = learned_mask.stats(model, zero)
    p = torch.cat(probs)
    assert stats["mask_soft_density"] == pytest.approx(float(p.mean()), rel=1e-6)
    assert stats["mask_hard_density"] == pytest.approx(float((p > 0.5).double().mean()))
    assert stats["mask_binary_gap"] == pytest.approx(float(torch.minimum(p, 1 - p).mean()), rel=1e-5)


def test_jaccard_of_bool_masks():
    a = {"w": torch.tensor([True, True, False, False])}
    b = {"w": torch.tensor([True, False, True, False])}
    assert learned_mask.jaccard(a, b) == pytest.approx(1 / 3) and learned_mask.jaccard(a, a) == 1.0


@pytest.mark.parametrize("scope", ["global", "layerwise", "erk"])
@pytest.mark.parametrize("kind", STEERED)
def test_pruning_a_learned_mask_keeps_exactly_the_density_and_logs_the_overlap(kind, scope):
    cfg = _cfg(**{"mask.kind": kind, "prune.pruner": "mask", "prune.scope": scope, "prune.density": 0.05,
                  "train.pre_epochs": 2, "train.post_epochs": 1})
    seen = []
    t = RunState(cfg, lambda m, c: seen.append(m))
    result = fit(t)
    kept, total = count(t.masks)
    assert result["density"] == kept / total and abs(kept - round(0.05 * total)) <= len(t.masks)
    prune = [m for m in seen if m["stage"] == "prune"][0]
    assert 0.0 <= prune["mask_jaccard"] <= 1.0
    pre = [m for m in seen if m["stage"] == "pre"]
    assert {"mask_target", "mask_lambda", "mask_soft_density", "mask_hard_density", "mask_binary_gap"} <= set(pre[-1])
    assert pre[-1]["mask_target"] == pytest.approx(0.05)


@pytest.mark.parametrize("kind", STEERED)
def test_on_digits_the_mask_reaches_the_target_density_and_is_what_pruning_keeps(kind):
    """The acceptance bar in small: 10 pre-training epochs on digits steer the mask to 3 % (soft density
    within 25 %, binary, and the pruned set is the mask's own)."""
    cfg = Config().replace(**{"mask.kind": kind, "prune.pruner": "mask", "prune.density": 0.03,
                              "train.post_epochs": 1, "train.latency_rounds": 0})
    seen = []
    run(cfg, lambda m, c: seen.append(m))
    pre = [m for m in seen if m["stage"] == "pre"][-1]
    prune = [m for m in seen if m["stage"] == "prune"][0]
    assert abs(pre["mask_soft_density"] / 0.03 - 1) < 0.25, pre
    assert pre["mask_binary_gap"] <= 0.05 and prune["mask_jaccard"] >= 0.9, (pre, prune)


def test_a_copy_restored_mid_pre_training_continues_with_its_multiplier():
    cfg = _cfg(**{"mask.kind": "sigmoid", "prune.pruner": "mask", "train.pre_epochs": 3, "train.post_epochs": 0,
                  "prune.density": 0.1})
    states = []
    full = run(cfg, lambda m, c: states.append(c()) if c and m.get("stage") == "pre" and len(states) < 1 else None)
    assert float(states[0]["mask_dual"]) != 0.0
    resumed = RunState(cfg)
    resumed.load_state_dict(states[0])
    out = fit(resumed)
    assert out["test_acc"] == full["test_acc"] and repr(out["history"]) == repr(full["history"])  # nan-safe


def test_the_mask_marks_reach_the_result_and_mlflow_final_metrics():
    from sparse_core.train import MASK_MARKS
    from sweeps.tracking import FINAL_METRICS

    assert set(MASK_MARKS) <= set(FINAL_METRICS)
    cfg = _cfg(**{"mask.kind": "sigmoid", "prune.pruner": "mask", "train.pre_epochs": 2, "train.post_epochs": 1})
    seen = []
    result = run(cfg, lambda m, c: seen.append(m))
    pre = [m for m in seen if m["stage"] == "pre"][-1]
    prune = [m for m in seen if m["stage"] == "prune"][0]
    assert result["mask_soft_density"] == pre["mask_soft_density"] and result["mask_jaccard"] == prune["mask_jaccard"]
    assert math.isnan(run(_cfg(**{"train.pre_epochs": 1, "train.post_epochs": 1}))["mask_jaccard"])
