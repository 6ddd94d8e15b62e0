"""The vision transformer (``model.name=vit``, sparse_core/vit.py): every projection is a named prunable layer; every
pruner, scope, schedule, RigL, both learned masks, ZerO and the post-pruning tricks run on it to the exact density;
each copy of a pack equals its single run; export and latency handle it; bad sizes are refused in one line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparse_core import export, latency
from sparse_core.config import Config, ModelConfig
from sparse_core.masks import prunable_layers
from sparse_core.models import build, soft_modules
from sparse_core.pruners import ScoreInputs, score
from sparse_core.pruning import collapsed, erk_densities, masks_from_scores, target_count
from sparse_core.runner import run_packed
from sparse_core.train import RunState, fit, run
from sparse_core.vit import GELUActivation, ViT, attend

# width 12 (3 heads of 4): no layer and no activation batch is a multiple of the CPU vector width, so copy k of a
# pack sits at other positions of every elementwise kernel than its single run does
TINY = {"data.name": "digits", "model.name": "vit", "model.width": 12, "model.depth": 2, "model.heads": 3,
        "train.batch_size": 128, "train.pre_epochs": 1, "train.post_epochs": 1, "train.latency_rounds": 0,
        "train.device": "cpu"}
LAYERS = ["embed"] + [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.q", "attn.k", "attn.v", "attn.out",
                                                                   "fc1.layer", "fc2")] + ["head"]
CASES = {
    "magnitude": {},
    "random": {"prune.pruner": "random"},
    "snip": {"prune.pruner": "snip"},
    "grasp": {"prune.pruner": "grasp"},
    "synflow_rounds": {"prune.pruner": "synflow", "prune.rounds": 3},
    "layerwise_iterative": {"prune.scope": "layerwise", "prune.rounds": 2, "prune.round_epochs": 1},
    "erk_rewind": {"prune.scope": "erk", "prune.rewind_epoch": 1},
    "gmp": {"prune.gradual_epochs": 1, "prune.gradual_every": 3},
    "rigl": {"train.method": "rigl", "rigl.delta_t": 2},
    "mask_sigmoid_zero": {"mask.kind": "sigmoid", "prune.pruner": "mask", "init.name": "zero", "train.pre_epochs": 2},
    "mask_hardconcrete": {"mask.kind": "hardconcrete", "prune.pruner": "mask", "train.pre_epochs": 2},
    "tricks": {"post.label_smoothing": True, "post.soft_activation": True, "post.soft_skip": True},
}


def _cfg(**extra) -> Config:
    return Config().replace(**{**TINY, **extra})


def test_every_projection_is_a_named_prunable_layer_sized_by_the_config():
    model = build(ModelConfig(name="vit", width=12, depth=2, heads=3), (1, 8, 8), 10)
    layers = prunable_layers(model)
    assert list(layers) == [f"{n}.weight" for n in LAYERS]
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    assert shapes["embed.weight"] == (12, 4)  # 2x2 patches of one channel: 16 tokens
    assert shapes["blocks.1.attn.k.weight"] == (12, 12) and shapes["blocks.0.fc1.layer.weight"] == (24, 12)
    assert shapes["head.weight"] == (10, 12) and model.tokens == 16
    cifar = build(ModelConfig(name="vit", width=16, depth=1, heads=2), (3, 32, 32), 10)
    assert cifar.tokens == 64 and tuple(cifar.embed.weight.shape) == (16, 48)  # 4x4 patches of 3 channels
    # LayerNorms and the position table are dense and not prunable: the density counts the projections only
    dense = {n for n, _ in model.named_parameters()} - {f"{n}.weight" for n in LAYERS}
    assert all(n.endswith("bias") or "norm" in n or n == "pos" for n in dense)


def test_attention_is_softmax_attention_per_head():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2 * 5, 8, generator=g) for _ in range(3))
    ours = attend(q, k, v, 2, 2)
    split = lambda z: z.view(2, 5, 2, 4).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(10, 8)
    assert torch.allclose(ours, ref, atol=1e-6)
    # a token attends only within its own image: changing image 1 leaves image 0's output as it was
    k2 = k.clone()
    k2[5:] += 3.0
    assert torch.equal(attend(q, k2, v, 2, 2)[:5], ours[:5]) and not torch.equal(attend(q, k2, v, 2, 2)[5:], ours[5:])


def test_masks_erk_and_collapse_detection_see_every_layer():
    model = build(ModelConfig(name="vit", width=12, depth=2, heads=3), (1, 8, 8), 10)
    scores = {n: m.weight.detach().abs() + 0.1 for n, m in prunable_layers(model).items()}
    total = sum(s.numel() for s in scores.values())
    for scope in ("global", "layerwise", "erk"):
        masks = masks_from_scores(scores, 0.1, scope)
        assert sum(int(m.sum()) for m in masks.values()) == target_count(total, 0.1), scope
    erk = erk_densities({n: tuple(s.shape) for n, s in scores.items()}, 0.1)
    assert erk["embed.weight"] > erk["blocks.0.attn.q.weight"] > erk["blocks.0.fc1.layer.weight"]
    masks = masks_from_scores(scores, 0.1, "layerwise")
    assert collapsed(masks) == []
    masks["blocks.1.attn.v.weight"].zero_()
    assert collapsed(masks) == ["blocks.1.attn.v.weight"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_method_reaches_the_exact_density_with_a_finite_accuracy(case, torch_one_thread):
    density = 0.05
    result = run(_cfg(**CASES[case], **{"prune.density": density}))
    total = sum(m.weight.numel() for m in prunable_layers(build(ModelConfig(name="vit", width=12, depth=2, heads=3),
                                                                   (1, 8, 8), 10)).values())
    assert result["kept_weights"] == target_count(total, density), case
    assert math.isfinite(result["test_acc"]) and math.isfinite(result["val_acc"])
    assert set(result["layer_density"]) == {f"{n}.weight" for n in LAYERS}


def test_the_dense_vit_learns_digits(torch_one_thread):
    result = run(_cfg(**{"prune.density": 1.0, "model.width": 32, "model.heads": 4, "train.batch_size": 64,
                         "train.pre_epochs": 2, "train.post_epochs": 3}))
    assert result["test_acc"] > 0.7  # chance is 0.1; 64-wide, 30 epochs reach 0.95 (docs/vit.md)


@pytest.mark.parametrize("case", ["magnitude", "synflow_rounds", "mask_hardconcrete", "tricks", "rigl", "gmp"])
def test_each_copy_of_a_pack_equals_its_single_run(case, torch_one_thread):
    copies = [(0, 0.1, 0.05), (1, 0.03, 0.05), (2, 0.1, 0.02)]  # (seed, density, lr): what a pack may differ in
    cfgs = [_cfg(**CASES[case], seed=s, **{"prune.density": d, "train.lr": lr}) for s, d, lr in copies]
    singles = [run(c) for c in cfgs]
    packed = run_packed(cfgs)
    for k, (one, many) in enumerate(zip(singles, packed)):
        assert isinstance(many, dict), f"copy {k} failed: {many!r}"
        for key in ("test_acc", "val_acc", "best_val_acc", "density", "kept_weights", "pre_val_acc", "collapsed_layers",
                    "layer_density"):
            assert one[key] == many[key] or (one[key] != one[key] and many[key] != many[key]), (case, k, key)
        assert [m["val_acc"] for m in one["history"]] == [m["val_acc"] for m in many["history"]]
        losses = torch.tensor([[m["train_loss"] for m in h["history"]] for h in (one, many)])
        assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert packed[0]["history"][0]["train_loss"] != packed[1]["history"][0]["train_loss"]


def test_packed_forward_is_the_modules_forward():
    """Evaluation, the pruners and the hooks use the module's forward, training the packed one: the same function."""
    t = RunState(_cfg(**{"mask.kind": "hardconcrete"}))
    model = t.model.eval()
    for block in model.blocks:
        block.fc1.skip_alpha, block.fc1.act.t = 0.5, 0.3
    params = dict(model.named_parameters())
    layers = prunable_layers(model)
    x = t.data.x_test[:7]
    packed = model.packed_forward(x[None], lambda p: layers[f"{p}.weight"].masked_weight()[None],
                                  lambda n: params[n][None] if n in params else None)[0]
    assert torch.allclose(packed, model(x), atol=1e-5, rtol=0)


def test_soft_activation_runs_from_silu_to_the_plain_gelu():
    model = build(ModelConfig(name="vit", width=12, depth=2, heads=3), (1, 8, 8), 10)
    acts, blocks = soft_modules(model)
    assert len(acts) == len(blocks) == 2 and all(isinstance(a, GELUActivation) for a in acts)
    x = torch.linspace(-4, 4, 101)
    act, gelu = acts[0], F.gelu(x.double()).float()  # float32 GELU is 1e-3 off (relative) near -4
    assert torch.equal(act(x), gelu)  # t = 1: the plain network
    act.t = 0.0
    assert torch.allclose(act(x), F.silu(x), atol=1e-7)
    act.t = 0.5
    assert torch.allclose(act(x), 0.5 * (F.silu(x) + gelu), atol=1e-6)


def _qk_over_v(scores: dict[str, torch.Tensor]) -> list[float]:
    mean = {n: float(s.mean()) for n, s in scores.items()}
    return [mean[f"blocks.{i}.attn.{p}.weight"] / mean[f"blocks.{i}.attn.v.weight"] for i in range(2) for p in "qk"]


def test_synflow_scores_attention_through_its_linearised_network(monkeypatch):
    """Data-free SynFlow (docs/vit.md): through LayerNorm and softmax, q and k get a few % of v's mean score per
    weight (all-ones tokens are alike: the softmax barely moves R); through ``synflow_forward`` (LayerNorm affine
    only, unnormalised attention) every path crosses one q, one k and one v weight: finite, nonzero everywhere."""
    cfg = _cfg()
    t = RunState(cfg)
    inputs = ScoreInputs(None, None, t.data.in_shape, torch.Generator().manual_seed(0), cfg.prune)
    scores = score("synflow", t.model, inputs)
    assert set(scores) == {f"{n}.weight" for n in LAYERS}
    for name, s in scores.items():
        assert bool(torch.isfinite(s).all()) and bool((s >= 0).all()) and float(s.sum()) > 0, name
    assert min(_qk_over_v(scores)) > 0.5
    monkeypatch.delattr(ViT, "synflow_forward")  # the model's own forward: LayerNorm and softmax
    assert max(_qk_over_v(score("synflow", t.model, inputs))) < 0.1


def test_export_round_trips_and_latency_reports_no_sparse_path(tmp_path, torch_one_thread):
    t = RunState(_cfg(**{"prune.density": 0.1, "train.latency_rounds": 2}))
    fit(t)
    path = str(tmp_path / "vit.safetensors")
    figures = export.figures(t, path)
    plain = export.load(path)
    x = t.data.x_test[:16]
    with torch.no_grad():
        assert torch.allclose(plain(x), t.model.eval()(x), atol=1e-5)
    assert figures["model_bytes_sparse"] < figures["model_bytes_dense"]
    assert figures["sparse_path"] == latency.NO_SPARSE_PATH
    assert figures["latency_dense_ms_b1"] > 0 and math.isnan(figures["latency_sparse_ms_b1"])
    assert math.isnan(figures["latency_ratio_b256"])


@pytest.mark.parametrize("model, shape, needle", [
    (ModelConfig(name="vit", width=12, heads=5), (1, 8, 8), "model.heads=5"),
    (ModelConfig(name="vit", width=12, heads=3, patch=3), (1, 8, 8), "model.patch=3"),
    (ModelConfig(name="vit", width=12, heads=3), (64,), "model.name='vit'"),
])
def test_sizes_that_do_not_fit_are_refused_in_one_line(model, shape, needle):
    with pytest.raises(ValueError, match=needle) as err:
        build(model, shape, 10)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("trick", ["soft_activation", "soft_skip"])
def test_the_soft_tricks_change_post_training_and_end_as_the_plain_vit(trick, torch_one_thread):
    plain = RunState(_cfg(**{"train.post_epochs": 2}))
    tricked = RunState(_cfg(**{"train.post_epochs": 2, f"post.{trick}": True}))
    a, b = fit(plain), fit(tricked)
    post = lambda r: [m["train_loss"] for m in r["history"] if m["stage"] == "post"]  # noqa: E731
    assert post(a)[0] != post(b)[0]
    acts, blocks = soft_modules(tricked.model)
    assert all(x.t == 1.0 for x in acts) and all(x.skip_alpha == 0.0 for x in blocks)
