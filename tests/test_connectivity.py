"""Effective density on hand-made masks with known answers, and on real runs."""

from __future__ import annotations

import pytest
import torch

from sparse_core.config import Config
from sparse_core.connectivity import effective
from sparse_core.train import run

T, F = True, False


def test_a_chain_of_linear_masks_counts_only_weights_on_input_to_output_paths():
    masks = {
        # 3 inputs -> 3 units: unit 0 fed by input 0; unit 1 fed by nothing; unit 2 fed by inputs 1, 2
        "a": torch.tensor([[T, F, F], [F, F, F], [F, T, T]]),
        # 3 -> 2: unit 0 fed by unit 1 (which has no input) only; unit 1 fed by units 0 and 2
        "b": torch.tensor([[F, T, F], [T, F, T]]),
        # 2 -> 1 output: only unit 1 reaches it
        "c": torch.tensor([[F, T]]),
    }
    out = effective(masks)
    # a: 3 kept, all sources are inputs; targets 0 and 2 reach the output (via b's unit 1): 3 effective
    # b: (0<-1) source has no input: dead; (1<-0), (1<-2) effective; c: (0<-1) effective
    assert out["effective_weights"] == 3 + 2 + 1
    assert out["effective_density"] == pytest.approx(6 / (9 + 6 + 2))
    assert out["effective_units"] == {"a": 2, "b": 1}


def test_a_unit_that_reaches_no_output_makes_its_inputs_ineffective():
    masks = {"a": torch.tensor([[T, T], [T, F]]), "b": torch.tensor([[T, F]])}  # unit 1 of a feeds nothing
    out = effective(masks)
    assert out["effective_weights"] == 2 + 1 and out["effective_units"] == {"a": 1}


def test_convolutions_count_per_channel_and_a_dense_net_is_fully_effective():
    conv = torch.zeros(2, 2, 3, 3, dtype=torch.bool)
    conv[0, 1, 1, 1] = True  # channel 1 -> 0 through one tap
    conv[1, 0, 0, 2] = True  # channel 0 -> 1, but channel 1 feeds no output below
    head = torch.tensor([[T, F]])  # 2 channels -> 1 class: only channel 0
    out = effective({"conv": conv, "head": head})
    assert out["effective_weights"] == 1 + 1 and out["effective_units"] == {"conv": 1}
    dense = {"a": torch.ones(4, 3, dtype=torch.bool), "b": torch.ones(2, 4, dtype=torch.bool)}
    assert effective(dense)["effective_density"] == 1.0


def test_layers_that_are_not_a_chain_give_none():
    assert effective({"a": torch.ones(3, 4, dtype=torch.bool), "b": torch.ones(2, 5, dtype=torch.bool)}) is None


def test_random_pruning_at_one_percent_is_far_sparser_in_effect_than_nominally():
    base = {"prune.density": 0.01, "train.pre_epochs": 1, "train.post_epochs": 1, "train.latency_rounds": 0}
    rnd = run(Config().replace(**base, **{"prune.pruner": "random"}))
    mask = run(Config().replace(**{**base, "train.pre_epochs": 3, "mask.kind": "sigmoid", "prune.pruner": "mask"}))
    assert rnd["density"] == pytest.approx(0.01, abs=1e-4)
    assert rnd["effective_density"] < 0.5 * rnd["density"]  # most kept weights are on no path
    assert 0.5 * mask["density"] < mask["effective_density"] <= mask["density"]  # the mask keeps a connected net
    assert set(rnd["effective_units"]) == set(list(rnd["layer_density"])[:-1])
