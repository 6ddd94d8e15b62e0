"""The model contract: a model declares its prunable layers (by default its Linear/Conv layers) and
writes one forward; the trainer's packed forward is derived from it (``models.derived_packed_forward``)
or is the model's hand-written fast path, which must compute the same numbers. A new model is one
registered builder: the toy model below, with a prunable layer that is neither Linear nor Conv, trains,
prunes and packs through the same trainer without touching any other file."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparse_core.config import Config
from sparse_core.masks import MaskedLinear, _Masked, declared_prunable, prunable_layers
from sparse_core.models import derived_packed_forward
from sparse_core.plan import PruneStep
from sparse_core.registry import MODELS
from sparse_core.runner import run_packed
from sparse_core.train import RunState, run
from sparse_core.trainer import Trainer

SYN = {"data.name": "synthetic", "data.synthetic_train": 128, "data.synthetic_test": 64, "train.batch_size": 32,
       "train.pre_epochs": 1, "train.post_epochs": 1, "prune.density": 0.3, "train.latency_rounds": 0}
VGG = {**SYN, "model.name": "vgg16", "model.width_mult": 0.0625, "data.synthetic_shape": "3x16x16"}


def _pack(flat: dict, k: int = 3) -> Trainer:
    states = [RunState(Config().replace(**flat, seed=s)) for s in range(k)]
    for t in states:
        t.prune(PruneStep(0, flat["prune.density"], True))
        t.model.train()
    return Trainer(states)


def _both(trainer: Trainer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """Logits of the hand-written and of the derived packed forward from the same stacks, and the
    stacks each left behind (BatchNorm's running statistics update in place)."""
    start = {n: t.detach().clone() for n, t in trainer.stacks.items()}
    out, after = [], []
    for forward in (trainer.model.packed_forward, lambda *a: derived_packed_forward(trainer.model, *a)):
        with torch.no_grad():
            for n, t in trainer.stacks.items():
                t.copy_(start[n])
        out.append(forward(x, trainer._weight, trainer.stacks.get, False))
        after.append({n: t.detach().clone() for n, t in trainer.stacks.items()})
    return out[0], out[1], after[0], after[1]


@pytest.mark.parametrize("flat", [{**SYN, "post.soft_skip": True, "post.soft_activation": True}, VGG],
                         ids=["mlp", "vgg16"])
def test_the_hand_written_packed_forward_equals_the_derived_one(flat):
    trainer = _pack(flat)
    for block in [m for m in trainer.model.modules() if hasattr(m, "skip_alpha")]:
        block.skip_alpha = 0.3  # a soft skip mid-schedule: the forward reads it
    x = torch.stack([b for b, _ in [next(trainer.batches())]][0].unbind(0))
    fast, derived, fast_after, derived_after = _both(trainer, x)
    assert fast.shape == derived.shape == (3, 32, 10)
    torch.testing.assert_close(fast, derived, rtol=1e-4, atol=1e-5)
    for name in fast_after:  # running statistics too (VGG's BatchNorm)
        torch.testing.assert_close(fast_after[name], derived_after[name], rtol=1e-5, atol=1e-6)
    loss = derived.sum()
    loss.backward()  # the derived forward is differentiable in the stacks
    assert all(trainer.stacks[n].grad is not None for n in prunable_layers(trainer.model))


def test_default_prunable_layers_are_the_linear_and_conv_layers():
    model = RunState(Config().replace(**VGG)).model
    names = declared_prunable(model)
    assert names == [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(names) == 14 and names[-1] == "head"


class Diagonal(nn.Module, _Masked):
    """A prunable layer that is neither Linear nor Conv: x * w (an element-wise gate)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self._init_mask_slots()

    def forward(self, x):
        return x * self.masked_weight()


class Toy(nn.Module):
    def __init__(self, n_in: int, num_classes: int, width: int, plain: bool):
        super().__init__()
        self.gate, self.hidden = Diagonal(n_in), nn.Linear(n_in, width)
        self.head = (nn.Linear if plain else MaskedLinear)(width, num_classes)  # prunable: with the mask slots

    def prunable_layers(self) -> list[str]:
        return ["gate", "head"]  # declared: the gate (no isinstance would find it) and the head, not hidden

    def forward(self, x):
        return self.head(torch.relu(self.hidden(self.gate(x.flatten(1)))))


@pytest.fixture
def toy_model():
    def build(cfg, in_shape, num_classes, plain=False, unit_grad_at_zero=False):
        return Toy(int(torch.tensor(in_shape).prod()), num_classes, cfg.width, plain)

    MODELS.register("toy_contract")(build)
    try:
        yield
    finally:
        MODELS.unregister("toy_contract")


def test_a_toy_model_registered_in_one_place_trains_prunes_and_packs(toy_model):
    flat = {**SYN, "model.name": "toy_contract", "model.width": 8, "prune.pruner": "magnitude",
            "prune.density": 0.5}
    cfgs = [Config().replace(**flat, seed=s) for s in range(2)]
    single = [run(c) for c in cfgs]
    for r in single:
        assert set(r["layer_density"]) == {"gate.weight", "head.weight"}  # what the model declared
        assert r["density"] == pytest.approx(0.5, abs=0.02) and r["test_acc"] > 0
    packed = run_packed(cfgs, share_prefix=False)
    for a, b in zip(single, packed):
        assert b["pack_size"] == 2
        assert a["layer_density"] == b["layer_density"]
        assert a["history"][-1]["train_loss"] == pytest.approx(b["history"][-1]["train_loss"], rel=1e-5)
