"""The packed optimizer: SGD with momentum or Adam over stacked parameters (a leading copy dimension),
with a learning rate and a weight decay per copy, and each copy's view of it."""

from __future__ import annotations

import math

import torch

from .plan import lr_factor

_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8


def per_copy(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _bcast(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (p.dim() - 1)))


class PackedOptimizer:
    """SGD with momentum (PyTorch's update: d = g + wd p; buf = momentum buf + d; p -= lr buf) or Adam
    over stacked parameters, with a learning rate and a weight decay per copy. Buffers start at 0 (a
    momentum buffer's first update is then d itself, as in PyTorch)."""

    def __init__(self, kind: str, momentum: float, groups: list[tuple[list[str], list[float], list[float]]],
                 stacks: dict[str, torch.Tensor]):
        self.kind, self.momentum, self.steps = kind, momentum, 0
        keys = ("exp_avg", "exp_avg_sq") if kind == "adam" else (("momentum_buffer",) if momentum else ())
        self.groups = []  # (names, base lr (K,), weight decay (K,) or None)
        for names, lrs, wds in groups:
            like = stacks[names[0]]
            self.groups.append((names, per_copy(lrs, like), per_copy(wds, like) if any(wds) else None))
        self.buffers = {n: {k: torch.zeros_like(stacks[n]) for k in keys} for g in groups for n in g[0]}

    @torch.no_grad()
    def step(self, stacks: dict[str, torch.Tensor], factor: float, keep_grads: bool = True) -> None:
        """One update; ``keep_grads=False``: the weight decay is added into the gradients in place (the
        same sums, no new tensors; the caller does not read the gradients after the step)."""
        self.steps += 1
        for names, base_lr, wd in self.groups:
            lr = base_lr * factor
            live = [n for n in names if stacks[n].grad is not None]
            params = [stacks[n] for n in live]
            grads = [p.grad for p in params]
            if wd is not None:  # d = g + wd p
                wds = [_bcast(wd, p) for p in params]
                if keep_grads:
                    grads = torch._foreach_addcmul(grads, params, wds)
                else:
                    torch._foreach_addcmul_(grads, params, wds)
            lrs = [_bcast(lr, p) for p in params]
            if self.kind == "adam":
                for name, p, g, step_lr in zip(live, params, grads, lrs):
                    self._adam(p, g, self.buffers[name], step_lr)
                continue
            if self.momentum:  # buf = momentum buf + d (one C++ loop over the tensors, not one Python op each)
                bufs = [self.buffers[n]["momentum_buffer"] for n in live]
                torch._foreach_mul_(bufs, self.momentum)
                torch._foreach_add_(bufs, grads)
                grads = bufs
            torch._foreach_addcmul_(params, grads, lrs, value=-1.0)  # p -= lr d

    def _adam(self, p, g, bufs, lr) -> None:
        b1, b2 = _ADAM_BETAS
        m, v = bufs["exp_avg"], bufs["exp_avg_sq"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2 ** self.steps)).add_(_ADAM_EPS)
        p.sub_(m / denom * (lr / (1 - b1 ** self.steps)))

    def load_copy(self, k: int, saved: dict) -> None:
        self.steps = saved["steps"]
        for name, bufs in saved["buffers"].items():
            for key, t in bufs.items():
                self.buffers[name][key][k].copy_(t)


class CopyOptimizer:
    """One copy's view of the packed optimizer, for the per-copy methods (RigL's
    ``zero_where``: ``state[param][key]`` is the copy's slice), the ``lr`` metric and checkpoints."""

    def __init__(self, packed: PackedOptimizer, k: int, trainer):
        self.packed, self.k, self.trainer = packed, k, trainer
        own = dict(trainer.model.named_parameters())
        self.state = {own[n]: {key: b[k] for key, b in bufs.items()} for n, bufs in packed.buffers.items() if n in own}

    @property
    def param_groups(self) -> list[dict]:
        t = self.trainer
        return [{"lr": t.cfg.train.lr * lr_factor(t.cfg.train.schedule, t.seg_step, t.seg_total)}]

    def state_dict(self) -> dict:
        return {"kind": self.packed.kind, "steps": self.packed.steps,
                "buffers": {n: {key: b[self.k].detach().cpu().clone() for key, b in bufs.items()}
                            for n, bufs in self.packed.buffers.items()}}
