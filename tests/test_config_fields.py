"""Every config field is described once, where it is declared (sparse_core/config.py): its help, whether it is part
of the run's identity, whether copies of a pack may differ in it, whether it is only read after the pre-training
fork, its named choices. The lists the rest of the code reads are derived from those declarations; these tests pin
them to the hand-written lists they replaced (same members), so deriving them changed nothing."""

from sparse_core import config
from sparse_core.packed import PACKABLE
from sparse_core.prefix import POST_FORK

# The hand-written lists as they were before the fields described themselves (order aside: every reader tests
# membership).
BEFORE_NOT_IDENTITY = ("train.device", "train.eval_batch_size", "train.fail_at_epoch", "data.dir", "data.download",
                       "train.latency_rounds")
BEFORE_PACKABLE = ("seed", "prune.density", "train.lr", "train.weight_decay", "mask.lr")
BEFORE_POST_FORK = ("prune.pruner", "prune.scope", "prune.rounds", "prune.gradual_epochs", "prune.gradual_every",
                    "prune.rescale", "prune.round_epochs", "prune.samples_per_class", "prune.grasp_temperature",
                    "prune.shuffle", "prune.reinit", "post.label_smoothing", "post.smoothing", "post.soft_activation",
                    "post.soft_skip", "post.soft_fraction", "post.skip_alpha0", "train.post_epochs",
                    "train.latency_rounds", "rigl.delta_t", "rigl.alpha", "rigl.end_fraction", "rigl.distribution")
BEFORE_REGISTRY_KEYS = {"data.name": "datasets", "model.name": "models", "init.name": "inits",
                        "prune.pruner": "pruners", "prune.scope": "scopes", "mask.kind": "mask_kinds"}


def _same_members(derived, before):
    assert len(derived) == len(set(derived)) == len(before)
    assert set(derived) == set(before)


def test_the_derived_lists_equal_the_hand_written_ones():
    _same_members(config.NOT_IDENTITY, BEFORE_NOT_IDENTITY)
    _same_members(PACKABLE, BEFORE_PACKABLE)
    _same_members(POST_FORK, BEFORE_POST_FORK)
    assert len(POST_FORK) == 23
    assert config.REGISTRY_KEYS == BEFORE_REGISTRY_KEYS


def test_a_field_without_a_role_is_caught_naming_it():
    import dataclasses

    import pytest

    from sparse_core.fields import PRE, knob, require_decided

    @dataclasses.dataclass(frozen=True)
    class Section:
        width: int = knob(8, "units", PRE)
        fresh: int = 3  # a new knob declared the old way: no help, no role

    @dataclasses.dataclass(frozen=True)
    class Root:
        new: Section = dataclasses.field(default_factory=Section)
        seed: int = knob(0, "seed", PRE)

    with pytest.raises(TypeError, match=r"new\.fresh declare no role") as e:
        require_decided(Root)
    assert "new.width" not in str(e.value) and "seed" not in str(e.value)
    require_decided(config.Config)  # the real config: every field decided (the import already checked it)
    with pytest.raises(TypeError, match="role must be a Role"):
        knob(1, "a help but a boolean for a role", True)


def test_the_help_is_the_declared_help_and_every_field_has_one():
    rows = config.describe()
    assert [k for k, _, _ in rows] == list(config.to_flat(config.Config()))
    assert all(meaning for _, _, meaning in rows)
    assert all(default == value for (_, default, _), value in zip(rows, config.to_flat(config.Config()).values()))
    meaning = dict((k, m) for k, _, m in rows)
    assert meaning["prune.density"].startswith("fraction of prunable weights KEPT")
    assert meaning["data.val_size"].endswith("synthetic (or a set too small for its standard) 10 %")


def test_named_choices_are_checked_where_declared():
    import pytest

    for key, bad, choices in (("prune.rescale", "cube", "auto, none, sqrt, data"),
                              ("rigl.distribution", "flat", "erk, uniform"),
                              ("train.method", "lottery", "prune, rigl"), ("train.schedule", "linear",
                                                                           "cosine, constant, step")):
        with pytest.raises(ValueError) as e:
            config.from_flat({key: bad})
        assert str(e.value) == f"{key}={bad!r} is not valid; choose one of {choices}"
