
import pytest
import torch

from sparse_core.config import Config, ModelConfig, PostConfig
from sparse_core.models import build, match_width
from sparse_core.post_prune import SoftSchedule, smoothed_cross_entropy, smoothed_targets, soft_state
from sparse_core.train import RunState, fit, plain_model

FAST = {"train.pre_epochs": 1, "train.post_epochs": 2}


def _cfg(**flat):
    return Config().replace(**{**FAST, **flat})


@pytest.mark.parametrize("kind", ["sigmoid", "gates"])
def test_learned_mask_density_falls_under_strong_l1_and_stays_one_without(kind):
    strong = {"mask.kind": kind, "prune.pruner": "mask", "train.pre_epochs": 4, "mask.lambda_l1": 5e-3,
              "mask.lr": 0.5, "mask.init": 0.2, "mask.target": False}  # constant L1 pressure, no density control
    seen = []
    fit(RunState(_cfg(**strong), lambda m, c: seen.append(m)))
    pre = [m for m in seen if m["stage"] == "pre"]
    assert pre[-1]["mask_below_half"] > pre[0]["mask_below_half"] + 0.2
    assert pre[-1]["mask_below_half"] > 0.3
    assert {"mask_below_half_zero_init", "mask_below_half_nonzero_init", "mask_mean"} <= set(pre[0])
    # no learned mask: nothing masked before pruning, density 1 throughout pre-training
    seen = []
    fit(RunState(_cfg(**{"train.pre_epochs": 3}), lambda m, c: seen.append(m)))
    assert all(m["density"] == 1.0 and "mask_mean" not in m for m in seen if m["stage"] == "pre")


def test_learned_mask_split_shows_zero_init_weights_are_switched_off():
    # ZerO leaves most weights exactly 0: their mask scores get no loss gradient, only the density pressure
    cfg = _cfg(**{"init.name": "zero", "mask.kind": "sigmoid", "prune.pruner": "mask", "train.pre_epochs": 3,
                  "prune.density": 0.05})
    seen = []
    fit(RunState(cfg, lambda m, c: seen.append(m)))
    last = [m for m in seen if m["stage"] == "pre"][-1]
    assert last["mask_below_half_zero_init"] > last["mask_below_half_nonzero_init"]


def test_label_smoothing_targets():
    y = torch.tensor([0, 3, 9])
    q = smoothed_targets(y, 10, 0.1)
    assert torch.allclose(q.sum(1), torch.ones(3))
    assert torch.allclose(q[torch.arange(3), y], torch.full((3,), 0.9))
    off = q.clone()
    off[torch.arange(3), y] = 0
    assert torch.allclose(off.sum(1), torch.full((3,), 0.1)) and torch.isclose(off[0, 1], torch.tensor(0.1 / 9))
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0)) * 3  # seeded: the conventions differ by a margin
    expected = -(q * torch.log_softmax(logits, 1)).sum(1).mean()
    assert torch.isclose(smoothed_cross_entropy(logits, y, 0.1), expected)
    # differs from PyTorch's a/C convention
    assert not torch.isclose(smoothed_cross_entropy(logits, y, 0.1),
                             torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1))


def test_soft_activation_is_silu_at_start_and_relu_at_the_end():
    cfg = PostConfig(soft_activation=True, soft_fraction=0.5)
    model = build(ModelConfig(width=8, depth=2), (1, 2, 2), 3)
    sched = SoftSchedule(model, cfg, total_steps=100)
    act = model.blocks[0].act
    x = torch.linspace(-3, 3, 61)
    sched.set(0)
    assert torch.allclose(act(x), torch.nn.functional.silu(x))
    sched.set(25)
    assert soft_state(0.25, cfg)[0] == pytest.approx(0.5)
    assert torch.allclose(act(x), 0.5 * torch.nn.functional.silu(x) + 0.5 * torch.relu(x))
    sched.set(50)
    assert torch.equal(act(x), torch.relu(x))
    sched.set(99)
    assert act.t == 1.0


def test_soft_skip_adds_identity_and_decays_to_zero():
    cfg = PostConfig(soft_skip=True, skip_alpha0=1.0, soft_fraction=0.5)
    assert soft_state(0.0, cfg)[1] == 1.0 and soft_state(0.25, cfg)[1] == 0.5 and soft_state(0.6, cfg)[1] == 0.0
    x = torch.randn(2, 5)
    like = torch.zeros(2, 3)
    assert torch.equal(match_width(x, like), x[:, :3])  # cropped
    assert torch.equal(match_width(x, torch.zeros(2, 7))[:, 5:], torch.zeros(2, 2))  # zero-padded
    assert match_width(torch.randn(1, 4, 8, 8), torch.zeros(1, 4, 4, 4)) is None  # shapes can't match
    model = build(ModelConfig(width=8, depth=2), (1, 2, 2), 3)
    block = model.blocks[1]
    with torch.no_grad():
        block.layer.weight.zero_()
        block.layer.bias.zero_()
    h = torch.rand(4, 8)
    block.skip_alpha = 0.7
    assert torch.allclose(block(h), 0.7 * h)  # pre-activation is exactly alpha * P(x)
    block.skip_alpha = 0.0
    assert torch.equal(block(h), torch.zeros(4, 8))


def test_all_post_prune_tricks_end_as_the_plain_network():
    cfg = _cfg(**{"post.label_smoothing": True, "post.soft_activation": True, "post.soft_skip": True,
                  "prune.density": 0.2, "train.post_epochs": 3})
    seen = []
    trainer = RunState(cfg, lambda m, c: seen.append(m))
    result = fit(trainer)
    post = [m for m in seen if m["stage"] == "post"]
    assert post[0]["skip_alpha"] > 0 and post[0]["soft_t"] < 1
    assert post[-1]["skip_alpha"] == 0.0 and post[-1]["soft_t"] == 1.0
    state = {k: v.cpu() for k, v in trainer.model.state_dict().items()}
    plain = plain_model(cfg, state, trainer.data.in_shape, trainer.data.num_classes)
    assert not any(type(m).__name__.startswith("Masked") for m in plain.modules())
    with torch.no_grad():
        acc = (plain(trainer.data.x_test).argmax(1) == trainer.data.y_test).float().mean().item()
    assert acc == pytest.approx(result["test_acc"])
    assert acc > 0.5


def test_rigl_keeps_per_layer_density_regrows_and_starts_grown_weights_at_zero():
    """RigL through the trainer's step (a pack of two copies): update steps see the dense gradient,
    per-layer counts never change, and grown weights start at exactly 0 with zero momentum."""
    from sparse_core.trainer import Trainer as Loop
    from sparse_core.train import RunState

    flat = {"data.name": "digits", "model.width": 32, "model.depth": 2, "train.method": "rigl",
            "rigl.delta_t": 1, "rigl.alpha": 0.3, "prune.density": 0.1}
    trainers = [RunState(_cfg(**flat).replace(seed=s)) for s in range(2)]
    for t in trainers:
        t.rigl_init()
    pack = Loop(trainers)
    pack.begin_segment("rigl", 0, 40)
    batches = pack.batches()
    grown_any = False
    for step in range(1, 6):
        before = {n: m.clone() for n, m in pack.masks.items()}
        x, y = next(batches)
        pack.step(x, y, "rigl")
        for name, stacked in pack.stacks.items():
            if name in before:  # the update step's gradient was the dense one: pruned weights have some
                assert bool((stacked.grad[before[name] == 0] != 0).any()), name
        for name, mask in pack.masks.items():
            assert torch.equal(mask.sum(dim=tuple(range(1, mask.dim()))),
                               before[name].sum(dim=tuple(range(1, mask.dim())))), name  # counts per copy
            grown = (mask != 0) & (before[name] == 0)
            if grown.any():
                grown_any = True
                assert torch.count_nonzero(pack.stacks[name][grown]) == 0  # regrown weights start at 0
                assert torch.count_nonzero(pack.opt.buffers[name]["momentum_buffer"][grown]) == 0
    rigl = trainers[0].rigl
    assert grown_any and rigl.regrown > 0 and trainers[1].rigl.regrown > 0
    assert rigl.drop_fraction(0) == pytest.approx(0.3) and rigl.drop_fraction(rigl.t_end) == pytest.approx(0.0)
    assert not rigl.is_update_step(rigl.t_end)


def test_rigl_through_the_trainer_keeps_density_and_stops_updating():
    cfg = _cfg(**{"train.method": "rigl", "prune.density": 0.1, "rigl.delta_t": 5})
    seen = []
    trainer = RunState(cfg, lambda m, c: seen.append(m))
    result = fit(trainer)
    assert result["density"] == pytest.approx(0.1, abs=1e-4) and result["rigl_regrown"] > 0
    assert all(m["density"] == pytest.approx(0.1, abs=1e-4) for m in seen)
    assert result["epochs"] == 3  # pre + post budget


def test_shuffle_control_through_the_trainer():  # prune.reinit: tests/test_pipeline_controls.py
    base = RunState(_cfg(**{"prune.density": 0.1}))
    fit(base)
    shuffled = RunState(_cfg(**{"prune.density": 0.1, "prune.shuffle": True}))
    fit(shuffled)
    for n, m in base.masks.items():
        assert int(m.sum()) == int(shuffled.masks[n].sum())
    assert any(not torch.equal(m, shuffled.masks[n]) for n, m in base.masks.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_init_relu_passes_the_gradient_where_the_input_is_at_least_zero(dtype):
    """ZerO's ReLU: derivative 1 at exactly 0 (either sign of zero), 0 below, down to the smallest subnormal."""
    from sparse_core.models import Activation

    info = torch.finfo(dtype)
    tiny = info.smallest_normal * info.eps  # the smallest subnormal
    x = torch.tensor([-1.0, -tiny, -0.0, 0.0, tiny, 2.0, -info.smallest_normal, 1e-30], dtype=dtype,
                     requires_grad=True)
    up = torch.arange(1.0, 9.0, dtype=dtype)
    y = Activation(unit_grad_at_zero=True)(x)
    (y * up).sum().backward()
    assert torch.equal(y.detach(), x.detach().clamp_min(0))
    assert x.grad.tolist() == [0.0, 0.0, 3.0, 4.0, 5.0, 6.0, 0.0, 8.0]
