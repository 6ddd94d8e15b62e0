import math

import pytest
import torch

from sparse_core.config import ModelConfig
from sparse_core.init import hadamard, initialise, zero_matrix
from sparse_core.masks import MaskedConv2d, MaskedLinear, prunable_weights, set_masks
from sparse_core.models import build


def _model():
    torch.manual_seed(0)
    model = build(ModelConfig(width=32, depth=2), (1, 8, 8), 10)
    initialise("kaiming", model, torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_masked_weight_stays_exactly_zero_through_training(optimizer):
    """The trainer's own step (a pack of three copies, each its own mask): after 60 post-pruning steps
    with momentum/Adam state and weight decay, every pruned weight and its optimizer state is exactly 0."""
    from sparse_core.config import Config
    from sparse_core.trainer import Trainer as Loop
    from sparse_core.plan import PruneStep
    from sparse_core.train import RunState

    flat = {"data.name": "digits", "model.width": 32, "model.depth": 2, "train.optimizer": optimizer,
            "train.lr": 0.1 if optimizer == "sgd" else 1e-2, "train.weight_decay": 5e-3, "prune.pruner": "random"}
    trainers = [RunState(Config().replace(**flat, seed=s)) for s in range(3)]
    for t in trainers:
        t.prune(PruneStep(0, 0.1, True))
    pack = Loop(trainers)
    pack.begin_segment("post", 0, 60)
    batches = pack.batches()
    for _ in range(60):
        x, y = next(batches, None) or next(batches := pack.batches())
        pack.step(x, y, "post")
    moved = 0
    for name, mask in pack.masks.items():
        pruned = mask == 0
        assert torch.count_nonzero(pack.stacks[name][pruned]) == 0, name
        for key, buf in pack.opt.buffers[name].items():
            assert torch.count_nonzero(buf[pruned]) == 0, (name, key)
        moved += int((pack.stacks[name][~pruned] != 0).sum())
        for k, t in enumerate(trainers):  # each copy's module sees its slice
            assert torch.equal(dict(t.model.named_parameters())[name], pack.stacks[name][k])
    assert moved > 0  # the kept weights did train


def test_masked_layers_have_the_plain_state_dict_keys():
    masked, plain = build(ModelConfig(), (1, 8, 8), 10), build(ModelConfig(), (1, 8, 8), 10, plain=True)
    set_masks(masked, {n: torch.ones_like(w, dtype=torch.bool) for n, w in prunable_weights(masked).items()})
    assert list(masked.state_dict()) == list(plain.state_dict())
    assert any(isinstance(m, MaskedLinear) for m in masked.modules())


def test_mlp_and_vgg16_prunable_counts_match_the_method():
    mlp = build(ModelConfig(), (1, 28, 28), 10)
    assert sum(w.numel() for w in prunable_weights(mlp).values()) == 119_400
    vgg = build(ModelConfig(name="vgg16"), (3, 32, 32), 10)
    assert sum(w.numel() for w in prunable_weights(vgg).values()) == 14_715_584
    assert sum(isinstance(m, MaskedConv2d) for m in vgg.modules()) == 13
    # biases and BatchNorm are not prunable
    assert all(n.endswith(".weight") and w.dim() in (2, 4) for n, w in prunable_weights(vgg).items())


def test_hadamard_is_orthogonal():
    h = hadamard(16)
    assert torch.equal(h @ h.T, 16 * torch.eye(16))


def test_zero_init_matrices():
    # out < in: partial identity
    assert torch.equal(zero_matrix(3, 5), torch.eye(3, 5))
    # out == in: identity
    assert torch.equal(zero_matrix(4, 4), torch.eye(4))
    # out > in: top-left block of the Hadamard matrix of size 2^m, m = ceil(log2(out)) = 3, scaled by
    # the paper's c = 2^(-(m-1)/2) = 1/2 (Algorithm 1), not the orthonormal 1/sqrt(8)
    m = zero_matrix(5, 3)
    h8 = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, -1, 1, -1, 1, -1, 1, -1], [1, 1, -1, -1, 1, 1, -1, -1],
                       [1, -1, -1, 1, 1, -1, -1, 1], [1, 1, 1, 1, -1, -1, -1, -1]], dtype=torch.float32)
    assert torch.allclose(m, h8[:5, :3] / 2)


def test_zero_init_on_models_is_deterministic_and_uses_the_centre_tap():
    vgg = build(ModelConfig(name="vgg16", width_mult=0.125), (3, 32, 32), 10)
    initialise("zero", vgg, torch.Generator().manual_seed(0))
    first = vgg.features[0].layer.weight  # (8, 3, 3, 3): out > in
    assert torch.count_nonzero(first[:, :, [0, 2], :]) == 0 and torch.count_nonzero(first[:, :, :, [0, 2]]) == 0
    assert torch.allclose(first[:, :, 1, 1], zero_matrix(8, 3))
    mlp = build(ModelConfig(width=16, depth=2), (1, 8, 8), 10)
    initialise("zero", mlp, torch.Generator().manual_seed(123))
    assert torch.equal(mlp.blocks[0].layer.weight, zero_matrix(16, 64))  # out < in
    assert torch.equal(mlp.blocks[1].layer.weight, torch.eye(16))
    assert torch.count_nonzero(mlp.blocks[0].layer.bias) == 0


def test_kaiming_is_seeded_by_its_generator():
    a, b, c = (build(ModelConfig(), (1, 8, 8), 10) for _ in range(3))
    for m, s in ((a, 1), (b, 1), (c, 2)):
        initialise("kaiming", m, torch.Generator().manual_seed(s))
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)
    std = a.blocks[1].layer.weight.std().item()
    assert abs(std - math.sqrt(2 / 100)) < 0.01


def test_enforce_zeroes_weights_and_optimizer_state_directly():
    """``Trainer.enforce`` after a step taken with a dense gradient (RigL's update step): every pruned weight
    and momentum entry back to 0, every kept one untouched."""
    from sparse_core.config import Config
    from sparse_core.trainer import Trainer as Loop
    from sparse_core.plan import PruneStep
    from sparse_core.train import RunState

    trainers = [RunState(Config().replace(**{"data.name": "digits", "model.width": 16, "model.depth": 2}, seed=s))
                for s in range(2)]
    for t in trainers:
        t.prune(PruneStep(0, 0.1, True))
    pack = Loop(trainers)
    pack.begin_segment("post", 0, 10)
    with torch.no_grad():
        for name in pack.masks:
            pack.stacks[name].fill_(1.0)
            pack.opt.buffers[name]["momentum_buffer"].fill_(1.0)
    pack.enforce()
    for name, mask in pack.masks.items():
        for t in (pack.stacks[name], pack.opt.buffers[name]["momentum_buffer"]):
            assert torch.equal(t, mask), name  # 1 where kept, 0 where pruned


def test_hooked_eval_forward_sees_every_prunable_layer_and_leaves_no_trace():
    import torch.nn as nn

    from sparse_core.masks import hooked_eval_forward, prunable_layers

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Dropout(0.5), nn.Linear(3, 2)).train()
    x = torch.ones(5, 4)
    seen = {}
    hooked_eval_forward(model, x, lambda m, o, name: seen.__setitem__(name, (m.training, tuple(o.shape))))
    assert seen == {"0.weight": (False, (5, 3)), "3.weight": (False, (5, 2))}  # eval mode: dropout off
    assert model.training and all(not layer._forward_hooks for layer in prunable_layers(model).values())
    outs = []  # a hook's return value replaces the layer's output: the next layer sees it

    def zero_first(m, o, name):
        outs.append(o)
        return torch.zeros_like(o) if name == "0.weight" else None

    hooked_eval_forward(model, x, zero_first)
    assert torch.equal(outs[1], model[3].bias.expand(5, 2))
    with pytest.raises(RuntimeError, match="boom"):
        hooked_eval_forward(model, x, lambda m, o, name: (_ for _ in ()).throw(RuntimeError("boom")))
    assert model.training and all(not layer._forward_hooks for layer in prunable_layers(model).values())
