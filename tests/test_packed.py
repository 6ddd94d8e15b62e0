"""Packed trials: every copy of a pack equals its own single run (same masks, weights within 1e-5,
same accuracy), for every pruner, the learned masks, the post-prune tricks, RigL, GMP, Adam and the
VGG; a copy that diverges fails alone; checkpoints move between packed and single runs."""

from __future__ import annotations

import pytest
import torch

from sparse_core.config import Config
from sparse_core.packed import PACKABLE, pack_key
from sparse_core.trainer import Trainer as Loop
from sparse_core.runner import run_packed
from sparse_core.train import RunState, TrainingDiverged, run

# width 13: no layer (64x13, 13x13, 13x10) and no batch of activations (last batch 13 x 13) is a multiple of
# the CPU vector width, so copy k of a pack sits at other positions of every elementwise kernel than a single
# run does (float32 sigmoid and SiLU then differed by an ulp, and a learned-mask copy lost a validation image)
TINY = {"data.name": "digits", "model.width": 13, "model.depth": 2, "train.batch_size": 128,
        "train.pre_epochs": 1, "train.post_epochs": 2, "train.latency_rounds": 0, "train.device": "cpu"}
# (seed, density, lr): the values a pack may differ in
COPIES = [(0, 0.1, 0.05), (1, 0.03, 0.05), (2, 0.1, 0.02)]

CASES = {
    "magnitude": {},
    "random": {"prune.pruner": "random"},
    "snip": {"prune.pruner": "snip"},
    "grasp": {"prune.pruner": "grasp"},
    "synflow_rounds": {"prune.pruner": "synflow", "prune.rounds": 3},
    "iterative_rounds_layerwise": {"prune.rounds": 2, "prune.round_epochs": 1, "prune.scope": "layerwise"},
    "erk_rewind": {"prune.scope": "erk", "prune.rewind_epoch": 1},
    "reinit_shuffle": {"prune.reinit": True, "prune.shuffle": True},
    "gmp": {"prune.gradual_epochs": 2, "prune.gradual_every": 3},
    "mask_sigmoid_target_zero": {"mask.kind": "sigmoid", "prune.pruner": "mask", "init.name": "zero",
                                 "train.pre_epochs": 2},
    "mask_gates": {"mask.kind": "gates", "prune.pruner": "mask"},
    "mask_hardconcrete": {"mask.kind": "hardconcrete", "prune.pruner": "mask", "train.pre_epochs": 2},
    "tricks": {"post.label_smoothing": True, "post.soft_activation": True, "post.soft_skip": True},
    "rigl": {"train.method": "rigl", "rigl.delta_t": 2},
    "adam": {"train.optimizer": "adam", "train.lr": 0.003},
    # 32x32 (2x2 after the last pool) and lr 0.003: at 16x16 the last BatchNorms see 1x1 maps, and at lr 0.01
    # (torch 2.14.1, AVX-512, 1 thread) training amplified the float32 rounding difference of a grouped and a
    # plain convolution (~1e-6) until one copy's weights were 0.16 apart and a mask differed; at 0.003: 2e-7
    "vgg_synthetic": {"data.name": "synthetic", "data.synthetic_shape": "3x32x32", "data.synthetic_train": 96,
                      "data.synthetic_test": 32, "model.name": "vgg16", "model.width_mult": 0.0625,
                      "train.batch_size": 32, "train.lr": 0.003, "post.soft_skip": True},
}

# A grouped and a plain convolution round differently (~1e-6); how far training carries that apart depends on
# the CPU's kernels: 2e-7 after 3 epochs on one AVX-512 machine, 1.9e-5 on another (torch 2.14.1, 1 thread).
# Masks and accuracies must still be equal.
WEIGHT_ATOL = {"vgg_synthetic": 1e-4}


def _configs(extra: dict) -> list[Config]:
    out = []
    for seed, density, lr in COPIES:
        flat = {**TINY, **extra, "seed": seed, "prune.density": density}
        flat["train.lr"] = extra.get("train.lr", lr) * (lr / 0.05)
        out.append(Config().replace(**flat))
    return out


def _recorder(store: list):
    return lambda metrics, checkpoint: store.append(checkpoint())


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_copy_equals_its_single_run(case, torch_one_thread):
    """At one thread, as trials run: with two, a plain and a grouped convolution pick other kernels and the
    VGG copies drifted 5e-5 apart (torch 2.14.1, AVX-512)."""
    cfgs = _configs(CASES[case])
    assert len({pack_key(c) for c in cfgs}) == 1
    singles, single_logs = [], []
    for c in cfgs:
        records: list = []
        singles.append(run(c, _recorder(records)))
        single_logs.append(records)
    packed_logs: list[list] = [[] for _ in cfgs]
    packed = run_packed(cfgs, [_recorder(r) for r in packed_logs])
    for k, (one, many) in enumerate(zip(singles, packed)):
        assert isinstance(many, dict), f"copy {k} failed: {many!r}"
        for key in ("test_acc", "val_acc", "best_val_acc", "test_acc_at_best_val", "density", "kept_weights",
                    "pre_val_acc", "prune_val_acc", "rigl_regrown", "collapsed_layers", "epochs"):
            assert one[key] == many[key] or (one[key] != one[key] and many[key] != many[key]), (case, k, key)
        assert [m["val_acc"] for m in one["history"]] == [m["val_acc"] for m in many["history"]]
        losses = torch.tensor([[m["train_loss"] for m in h["history"]] for h in (one, many)])
        assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        a, b = single_logs[k][-1], packed_logs[k][-1]
        if a["masks"] is not None or b["masks"] is not None:
            assert a["masks"].keys() == b["masks"].keys()
            for name in a["masks"]:
                assert torch.equal(a["masks"][name], b["masks"][name]), (case, k, name)
        for name, w in a["model"].items():
            assert torch.allclose(w.float(), b["model"][name].float(), atol=WEIGHT_ATOL.get(case, 1e-5), rtol=0), \
                (case, k, name)
    # the copies really differ from each other (a pack that trained one copy K times would fail here)
    assert packed[0]["history"][0]["train_loss"] != packed[1]["history"][0]["train_loss"]


def test_transcendental_elementwise_ops_give_each_copy_its_single_value():
    """The learned mask's sigmoid and the soft activation's SiLU: copy k of a stack (at a position of the
    vectorised kernel that is not a single run's) gets bitwise the value its single run computes."""
    from sparse_core.config import MaskConfig
    from sparse_core.learned_mask import get
    from sparse_core.models import Activation

    g = torch.Generator().manual_seed(0)
    score = torch.randn(4, 13, 10, generator=g) * 3
    noise = torch.rand(4, 13, 10, generator=g)
    act = Activation()
    act.t = 0.4
    x = torch.randn(4, 13, 13, generator=g) * 4
    for kind in ("sigmoid", "hardconcrete"):
        mask = get(MaskConfig(kind=kind))
        for k in range(4):
            assert torch.equal(mask.forward_mask(score, 7.0, noise)[k], mask.forward_mask(score[k:k + 1], 7.0,
                                                                                         noise[k:k + 1])[0])
            assert torch.equal(mask.keep_prob(score, 7.0).flatten(1).sum(1)[k],
                               mask.keep_prob(score[k:k + 1], 7.0).flatten(1).sum(1)[0])
    for k in range(4):
        assert torch.equal(act(x)[k], act(x[k:k + 1])[0])


def test_a_diverging_copy_fails_alone():
    cfgs = [Config().replace(**TINY, seed=0, **{"train.lr": 0.05}),
            Config().replace(**TINY, seed=1, **{"train.lr": 1e6}),
            Config().replace(**TINY, seed=2, **{"train.lr": 0.05})]
    out = run_packed(cfgs)
    assert isinstance(out[1], TrainingDiverged) and "train.lr=1000000.0" in str(out[1])
    for k in (0, 2):
        assert out[k]["test_acc"] == run(cfgs[k])["test_acc"]
    with pytest.raises(TrainingDiverged):
        run(cfgs[1])


def test_checkpoints_move_between_packed_and_single_runs():
    """A copy's state after pre-training restores into a single run (and the reverse: copies restored
    at different plan positions), and every run ends as its uninterrupted single run."""
    cfgs = _configs({"prune.rounds": 2, "prune.round_epochs": 1})
    whole = [run(c) for c in cfgs]
    states: list[list] = [[] for _ in cfgs]
    run_packed(cfgs, [lambda m, c, s=s: s.append(c()) for s in states])
    mid = states[0][0]  # copy 0 after its first epoch (inside a segment: optimizer state included)
    assert mid["optimizer"] is not None and mid["step_idx"] == 1
    assert run(cfgs[0], state=mid)["test_acc"] == whole[0]["test_acc"]
    # copy 1 restored at step 3, copy 2 from scratch, copy 0 at step 1: three positions in one call
    out = run_packed(cfgs, states=[mid, states[1][2], None])
    assert [o["test_acc"] for o in out] == [w["test_acc"] for w in whole]
    assert [o["val_acc"] for o in out] == [w["val_acc"] for w in whole]


@pytest.mark.parametrize("extra", [{"mask.kind": "sigmoid", "prune.pruner": "mask"},
                                   {"mask.kind": "gates", "prune.pruner": "mask"},
                                   {"post.soft_activation": True, "post.soft_skip": True, "prune.rounds": 2,
                                    "prune.round_epochs": 1}], ids=["sigmoid", "gates", "tricks_rounds"])
def test_resuming_from_any_step_ends_as_the_uninterrupted_run(extra):
    """Every checkpoint of the plan, restored into a fresh run, gives the uninterrupted result (a learned
    mask's temperature travels with it: the fold at pruning uses it)."""
    cfg = Config().replace(**{**TINY, **extra, "train.pre_epochs": 2})
    states: list = []
    whole = run(cfg, lambda m, c: states.append(c()))
    for state in states[:-1]:
        again = run(cfg, state=state)
        assert (again["test_acc"], again["val_loss"]) == (whole["test_acc"], whole["val_loss"]), state["step_idx"]


def test_pack_key_separates_graphs_and_names_what_may_differ():
    base = Config().replace(**TINY)
    assert "seed" in PACKABLE and "prune.density" in PACKABLE and "train.lr" in PACKABLE
    assert pack_key(base) == pack_key(base.replace(seed=3, **{"prune.density": 0.5, "train.lr": 0.1}))
    assert pack_key(base) != pack_key(base.replace(**{"model.width": 17}))
    assert pack_key(base) != pack_key(base.replace(**{"prune.pruner": "snip"}))
    assert pack_key(base) != pack_key(base.replace(**{"prune.density": 1.0}))  # no pruning steps in its plan
    mixed = run_packed([base, base.replace(**{"model.width": 17}), base.replace(seed=1)])  # two packs
    assert [r["pack_size"] for r in mixed] == [2, 1, 2]
    with pytest.raises(ValueError, match="differ in more than"):
        Loop([RunState(base), RunState(base.replace(**{"post.soft_skip": True}))])


def test_copy_parameters_are_slices_of_the_stacks():
    """The copies' own modules (evaluation, pruners, export) see the packed weights without copying."""
    cfgs = _configs({})
    trainers = [RunState(c) for c in cfgs]
    pack = Loop(trainers)
    for k, t in enumerate(trainers):
        for name, p in t.model.named_parameters():
            assert p.data_ptr() == pack.stacks[name][k].data_ptr()
    with torch.no_grad():
        pack.stacks["head.weight"][1].fill_(7.0)
    assert bool((trainers[1].model.head.weight == 7.0).all()) and not bool((trainers[0].model.head.weight == 7.0).any())


def test_packed_vgg_gradients_equal_the_single_copy_in_float64():
    """Grouped convolutions and stacked BatchNorm: in float64 a pack of three identical copies gives each
    copy exactly the gradient of the pack of one (in float32 they differ by rounding only)."""
    torch.set_default_dtype(torch.float64)
    try:
        cfg = _configs(CASES["vgg_synthetic"])[0].replace(**{"post.soft_skip": False})
        one, three = Loop([RunState(cfg)]), Loop([RunState(cfg) for _ in range(3)])
        x, y = one.lead.data.x_train[:16].double(), one.lead.data.y_train[:16]
        for pack in (one, three):
            pack.begin_segment("pre", 0, 10)
            pack.lead.model.train()
        one.step(x[None], y[None], "pre")
        three.step(torch.stack([x] * 3), torch.stack([y] * 3), "pre")
        for name, stacked in one.stacks.items():
            if stacked.dtype.is_floating_point:
                for k in range(3):
                    assert torch.equal(stacked[0], three.stacks[name][k]), name
    finally:
        torch.set_default_dtype(torch.float32)
