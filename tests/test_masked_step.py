"""The packed step's masked weight without the mask multiply: the masked-out weights and their
optimizer state stay exactly 0 step after step (so ``Trainer.enforce`` runs only after new masks or a
dense-gradient step), and ``masks._ZeroedMasked`` is bitwise the product ``w * mask``."""

import torch

from sparse_core.config import Config
from sparse_core.masks import masked_weight
from sparse_core.plan import PruneStep, TrainEpoch
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


def _mid_post_pack(**extra) -> Trainer:
    """Three copies (different densities and seeds) half-way through a soft post-pruning schedule, with
    a learned mask's scores where ``extra`` asks for one."""
    flat = {"data.name": "synthetic", "data.synthetic_shape": "1x8x8", "data.synthetic_train": 256,
            "data.synthetic_test": 70, "model.width": 32, "model.depth": 2, "train.batch_size": 32,
            "train.eval_batch_size": 24, "train.pre_epochs": 0, "train.post_epochs": 2,
            "post.soft_activation": True, "post.soft_skip": True, **extra}
    states = []
    for seed, density in ((0, 0.2), (1, 0.05), (2, 0.5)):
        s = RunState(Config().replace(**flat, seed=seed, **{"prune.density": density}))
        s.prune(PruneStep(0, density, last=True))
        states.append(s)
    trainer = Trainer(states)
    trainer.begin_segment("post", 0, 16)
    post = next(s for s in states[0].plan if isinstance(s, TrainEpoch) and s.stage == "post")
    for c in states:
        c.epoch_begin(post, 16)
    for x, y in list(trainer.batches())[:5]:
        trainer.step(x, y, "post", soft=trainer.lead.soft)
    for c in states:
        c.settle(post, 1.0, 5, 16)
    return trainer


def test_the_packed_evaluation_gives_each_copy_its_own_models_figures_bitwise():
    trainer = _mid_post_pack()
    assert trainer.model.packed_eval and trainer.lead.soft is not None
    assert 0.0 < trainer.model.blocks[0].act.t < 1.0 or trainer.model.blocks[0].skip_alpha > 0.0  # mid-schedule
    packed = trainer.evaluate()
    assert sorted(packed) == [0, 1, 2]
    for k, c in enumerate(trainer.copies):
        alone = c.evaluate()  # the copy's own module forward, batch by batch (70 = 24 + 24 + 22 images)
        assert packed[k] == alone, k
    assert len({packed[k]["val_loss"] for k in packed}) == 3  # three different networks were scored
    trainer.failed[1] = RuntimeError("diverged")
    assert sorted(trainer.evaluate()) == [0, 2]
    trainer.failed[0] = RuntimeError("diverged")  # the lead's modules hold the schedules: each copy evaluates
    assert trainer.evaluate() == {}


def test_the_packed_evaluation_of_a_learned_mask_in_pre_training_is_each_copys_own():
    flat = {"data.name": "synthetic", "data.synthetic_shape": "1x8x8", "data.synthetic_train": 256,
            "data.synthetic_test": 40, "model.width": 16, "model.depth": 2, "train.batch_size": 32,
            "train.pre_epochs": 2, "train.post_epochs": 1, "mask.kind": "sigmoid"}
    states = [RunState(Config().replace(**flat, seed=seed, **{"prune.density": d})) for seed, d in ((0, 0.1), (1, 0.02))]
    trainer = Trainer(states)
    pre = states[0].plan[0]
    assert isinstance(pre, TrainEpoch) and pre.stage == "pre"
    trainer.begin_segment("pre", 0, 16)
    for c in states:
        c.epoch_begin(pre, 16)
    for x, y in list(trainer.batches())[:6]:
        trainer.step(x, y, "pre")
    assert trainer.layers["head.weight"].mask_score is not None
    packed = trainer.evaluate()
    assert [packed[k] for k in (0, 1)] == [c.evaluate() for c in states]
