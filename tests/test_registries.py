"""Every registered method is tested for free: tests parametrized over the registries, and a toy
pruner and a toy post-prune trick, each registered in one place, picked up by the trainer, the CLI,
the sweeps' designs and the Optuna space."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from sparse_core import post_prune
from sparse_core.config import Config
from sparse_core.models import build
from sparse_core.registry import INITS, MASK_KINDS, TRICKS
from sparse_core.train import RunState, fit, plain_model, run

SYN = {"data.name": "synthetic", "data.synthetic_train": 256, "data.synthetic_test": 128, "model.width": 16,
       "model.depth": 2, "train.batch_size": 64, "train.pre_epochs": 1, "train.post_epochs": 2, "prune.density": 0.2}


def _cfg(**kw) -> Config:
    return Config().replace(**{**SYN, **kw})


@pytest.mark.parametrize("name", INITS.names())
def test_every_init_is_deterministic_and_finite(name):
    a, b = (build(Config().model, (1, 8, 8), 10) for _ in range(2))
    INITS.get(name)(a, torch.Generator().manual_seed(0))
    INITS.get(name)(b, torch.Generator().manual_seed(0))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), n
    assert any(p.abs().sum() > 0 for p in a.parameters())


@pytest.mark.parametrize("kind", [k for k in MASK_KINDS.names() if k != "none"])
def test_every_mask_kind_trains_reports_and_is_folded_into_a_plain_network(kind):
    seen = []
    result = run(_cfg(**{"mask.kind": kind, "prune.pruner": "mask"}), lambda m, c: seen.append(m))
    pre = [m for m in seen if m["stage"] == "pre"]
    assert pre and {"mask_soft_density", "mask_hard_density", "mask_binary_gap"} <= set(pre[0])
    assert result["density"] == pytest.approx(0.2, abs=1e-3)


@pytest.mark.parametrize("name", TRICKS.names())
def test_every_post_prune_trick_changes_training_and_ends_as_the_plain_network(name):
    trick = TRICKS.get(name)
    on = RunState(_cfg(**{trick.switch: True}))
    result = fit(on)
    off = run(_cfg())
    assert on.history != off["history"]  # it does something
    state = {k: v.cpu() for k, v in on.model.state_dict().items()}
    plain = plain_model(on.cfg, state, on.data.in_shape, on.data.num_classes)
    with torch.no_grad():
        acc = (plain(on.data.x_test).argmax(1) == on.data.y_test).float().mean().item()
    assert acc == pytest.approx(result["test_acc"])  # the trained network is the plain architecture
    if trick.value is not None:  # a schedule: off-plain at the start, plain by the end
        assert trick.value(0.0, on.cfg.post) != trick.plain and trick.value(1.0, on.cfg.post) == trick.plain


def test_two_tricks_that_each_replace_the_loss_are_refused_before_training():
    TRICKS.register("toy_loss")(post_prune.Trick(switch="post.soft_skip", loss=lambda logits, y, cfg: logits.sum(1)))
    try:
        with pytest.raises(ValueError, match="label_smoothing, toy_loss each replace the loss"):
            RunState(_cfg(**{"post.label_smoothing": True, "post.soft_skip": True}))
    finally:
        TRICKS.unregister("toy_loss")


def test_the_search_space_holds_every_tricks_knobs():
    from sweeps.optuna_search import SPACE

    on = Config().replace(**{TRICKS.get(n).switch: True for n in TRICKS})
    for name in TRICKS:
        for key in TRICKS.get(name).knobs:
            assert key in SPACE and SPACE[key][3](on) and not SPACE[key][3](Config())


def test_a_toy_post_prune_trick_in_one_place_reaches_the_trainer_and_the_designs():
    """A real trick also adds its bool switch (and knobs) to PostConfig; this one borrows the existing
    post.label_smoothing switch so the test needs no config change."""
    from sweeps import designs

    calls = []

    def apply(model, value):
        calls.append(value)

    TRICKS.register("toy_schedule")(post_prune.Trick(
        switch="post.label_smoothing", knobs={"post.smoothing": ("uniform", 0.0, 0.3)},
        value=lambda p, cfg: 1.0 - p, apply=apply, plain=0.0, metric="toy_value"))
    try:
        labels = [label for label, _ in designs.cells("leave-one-out")]
        assert {"base+toy_schedule", "full-no_toy_schedule"} <= set(labels)
        assert len(designs.cells("factorial")) == 2 ** len(designs.component_names()) == 64
        seen = []
        run(_cfg(**{"post.label_smoothing": True}), lambda m, c: seen.append(m))
        post = [m for m in seen if m["stage"] == "post"]
        # the value set at each epoch's last step (4 steps an epoch, 8 in all): 1 - 3/8, 1 - 7/8
        assert [round(m["toy_value"], 6) for m in post] == [0.625, 0.125]
        assert calls[0] == 1.0 and calls[-1] == 0.0  # scheduled from the first step, plain at the end
    finally:
        TRICKS.unregister("toy_schedule")
    assert "base+toy_schedule" not in [label for label, _ in designs.cells("leave-one-out")]


def test_a_toy_pruner_registered_in_one_place_is_run_by_the_cli():
    script = textwrap.dedent("""
        import sys
        from sparse_core.registry import PRUNERS
        from sparse_core.masks import prunable_weights

        @PRUNERS.register("toy_cli_pruner")
        def toy(model, inputs):
            return {n: -w.detach().abs() for n, w in prunable_weights(model).items()}  # keep the SMALLEST

        from sparse_core.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    out = subprocess.run([sys.executable, "-c", script, "prune.pruner=toy_cli_pruner", "data.name=synthetic",
                          "train.pre_epochs=1", "train.post_epochs=1", "--quiet"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert '"prune.pruner": "toy_cli_pruner"' in out.stdout
    bad = subprocess.run([sys.executable, "-m", "sparse_core", "prune.pruner=toy_cli_pruner"], capture_output=True,
                         text=True, timeout=900)
    assert bad.returncode == 2 and "toy_cli_pruner" in bad.stderr  # not registered in a plain process
