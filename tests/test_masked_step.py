"""The packed step's masked weight without the mask multiply: the masked-out weights and their
optimizer state stay exactly 0 step after step (so ``Trainer.enforce`` runs only after new masks or a
dense-gradient step), and ``masks._ZeroedMasked`` is bitwise the product ``w * mask``."""

import torch

from sparse_core.config import Config
from sparse_core.masks import masked_weight
from sparse_core.plan import PruneStep
from sparse_core.run_state import RunState
from sparse_core.trainer import Trainer


def test_zeroed_masked_weight_is_the_product_bitwise_with_the_gradient_in_the_weights_layout():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(3, 5, 4, generator=g) < 0.5).float()
    w = torch.randn(3, 5, 4, generator=g) * mask
    w[mask == 0] = torch.where(torch.rand(int((mask == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    h = torch.randn(3, 6, 4, generator=g)
    grads = []
    for zeroed in (False, True):
        p = w.clone().requires_grad_(True)
        eff = masked_weight(p, mask, zeroed=zeroed)
        assert torch.equal(eff, w * mask) and torch.equal(eff.signbit(), (w * mask).signbit())
        torch.bmm(h, eff.transpose(1, 2)).square().sum().backward()  # upstream gradient arrives transposed
        grads.append(p.grad)
    assert torch.equal(grads[0], grads[1])
    assert grads[1].stride() == w.stride()


def _pruned_pack(optimizer: str) -> Trainer:
    flat = {"data.name": "synthetic", "data.synthetic_shape": "1x8x8", "data.synthetic_train": 256,
            "data.synthetic_test": 64, "model.width": 32, "model.depth": 2, "train.batch_size": 32,
            "train.pre_epochs": 0, "train.post_epochs": 1, "train.optimizer": optimizer,
            "train.weight_decay": 0.01, "prune.density": 0.2}
    states = []
    for seed in (0, 1):
        s = RunState(Config().replace(**flat, seed=seed))
        s.prune(PruneStep(0, 0.2, last=True))
        states.append(s)
    trainer = Trainer(states)
    trainer.begin_segment("post", 0, 100)
    return trainer


def test_masked_out_weights_and_optimizer_state_stay_exactly_zero_without_enforce():
    for optimizer in ("sgd", "adam"):
        trainer = _pruned_pack(optimizer)
        # a stale momentum at masked-out positions (as after a sparse start that keeps the optimizer)
        for bufs in trainer.opt.buffers.values():
            for b in bufs.values():
                b.fill_(1.0)
        assert not trainer.zeroed
        batches = list(trainer.batches())
        for x, y in batches[:4]:
            trainer.step(x, y, "post")
            assert trainer.zeroed  # enforced once, before the first forward, and not undone by a step
            for name, mask in trainer.masks.items():
                off = mask == 0
                assert off.any()
                assert torch.count_nonzero(trainer.stacks[name][off]) == 0, (optimizer, name)
                for b in trainer.opt.buffers[name].values():
                    assert torch.count_nonzero(b[off]) == 0, (optimizer, name)
                assert torch.count_nonzero(trainer.stacks[name][~off]) > 0
