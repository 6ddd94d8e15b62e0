"""Accuracy, density and FLOPs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import eval_batches
from .masks import count, hooked_eval_forward, layer_density


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             amp: bool = False) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode; restores the model's train/eval mode."""
    was_training = model.training
    if was_training:  # a model already in eval mode (the caller evaluates several sets) is not walked again
        model.eval()
    correct, loss_sum = 0, 0.0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and x.is_cuda)
    for xb, yb in eval_batches(x, y, batch_size):
        with autocast:
            logits = model(xb)
        loss_sum += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    if was_training:
        model.train()
    n = max(int(y.shape[0]), 1)
    return correct / n, loss_sum / n


@torch.no_grad()
def evaluate_packed(forward, k: int, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                    amp: bool = False) -> list[tuple[float, float]]:
    """``evaluate`` of K packed copies at once: ``forward(xs)`` maps the batch repeated per copy (K, B, ...) to
    logits (K, B, classes), one packed forward per batch instead of one forward per copy. Per copy, the loss
    is summed as ``evaluate`` sums it (``cross_entropy`` over the copy's own logits, in batch order), so a
    copy's figures are what its own model gives wherever the packed linear layer computes as the plain one
    (``tests/test_masked_step.py`` checks each copy's figures against its own module's, bit for bit)."""
    correct, loss_sum = torch.zeros(k, dtype=torch.long), [0.0] * k
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and x.is_cuda)
    for xb, yb in eval_batches(x, y, batch_size):
        with autocast:
            logits = forward(xb.unsqueeze(0).expand(k, *xb.shape).contiguous())
        for i in range(k):
            loss_sum[i] += float(F.cross_entropy(logits[i].float(), yb, reduction="sum"))
        correct += (logits.argmax(2) == yb).sum(1).cpu()
    n = max(int(y.shape[0]), 1)
    return [(int(c) / n, s / n) for c, s in zip(correct, loss_sum)]


def density_summary(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict:
    """Density over prunable weights, per layer, and over all parameters (biases and BN count as kept)."""
    kept, prunable = count(masks)
    all_params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("mask_score"))
    return {
        "density": kept / prunable,
        "density_all": (all_params - prunable + kept) / all_params,
        "prunable_weights": prunable,
        "kept_weights": kept,
        "layer_density": layer_density(masks),
    }


@torch.no_grad()
def flops(model: nn.Module, in_shape: tuple[int, ...], masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(dense, sparse) FLOPs of one forward pass of one input.

    Dense: 2 per multiply-add of every prunable layer (Linear and Conv: the models' only matmuls and
    convolutions), which is what ``torch.utils.flop_counter`` counts (a test checks it); counting with
    forward hooks instead of its dispatch mode keeps ``torch._dynamo`` (1.5 s of imports) out of a run.
    Sparse: each layer's FLOPs scaled by its density (a zero weight's multiply-adds are skipped).
    """
    per_layer: dict[str, int] = {}  # out elements x fan-in multiply-adds, 2 FLOPs each

    def hook(layer, out, name):
        per_layer[name] = 2 * out.numel() * (layer.weight[0].numel())

    param = next(model.parameters())
    hooked_eval_forward(model, torch.zeros((1, *in_shape), device=param.device, dtype=param.dtype), hook)
    dense = sum(per_layer.values())
    removed = sum(per_layer[n] * (1.0 - float(masks[n].float().mean())) for n in per_layer)
    return dense, int(round(dense - removed))


CHANCE_FACTOR = 1.5  # "at chance": accuracy below this multiple of the best constant guess


def chance_accuracy(y: torch.Tensor, num_classes: int) -> float:
    """Accuracy of the best constant guess on labels ``y``: the most frequent class's share (at
    least 1/num_classes). A network that learned nothing, or diverged, predicts one class and
    scores about this."""
    counts = torch.bincount(y.detach().long().cpu(), minlength=num_classes)
    return max(float(counts.max()) / max(int(y.numel()), 1), 1.0 / num_classes)


def at_chance(acc: float, y: torch.Tensor, num_classes: int) -> bool:
    """True when ``acc`` is below ``CHANCE_FACTOR`` x ``chance_accuracy`` (NaN counts as at chance)."""
    return not acc >= CHANCE_FACTOR * chance_accuracy(y, num_classes)


def chance_marks(acc: float, y: torch.Tensor, num_classes: int) -> dict:
    """{"chance_acc": the best constant guess's accuracy on ``y``, "at_chance": at_chance(acc, ...)}."""
    return {"chance_acc": chance_accuracy(y, num_classes), "at_chance": at_chance(acc, y, num_classes)}
