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
