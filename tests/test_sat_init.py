"""The SAT-style model's initialisation (issue 15): class bias at logit(foreground prior) from the training
segmentations, distinguishable class queries (centred embeddings, learned-scale cosine), checkpoints from before
the change loading with the old formula, and a short training that learns where the old initialisation does not.
Before/after numbers over more seeds: ``python tests/measure_sat_init.py``."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from kd_toy import TRAIN, make_trainer, nnunet_env, write_dataset
from measure_sat_init import pairwise_query_cosine
from sat_helpers import (
    CLASS_NAMES,
    dataset_json,
    sat_config,
    sat_network,
    synthetic_cases,
    synthetic_sat_network,
    text_like_embeddings,
    tiny_plans,
    to_legacy,
    train_until_dice,
    write_model_folder,
)

from nnunetv2_lorkd.sat import (
    FALLBACK_PRIOR,
    HEAD_VERSION,
    ClassPromptHead,
    SATConfig,
    SATConfigError,
    foreground_priors,
    subsample_evenly,
)

NEW_KEYS = ("prompt.logit_scale", "prompt.head_version")


def _sat_plans():
    plans, configuration = tiny_plans()
    sat_config().store_in(plans, configuration, {})
    return plans, configuration


def _old_state(net) -> dict:
    """What a checkpoint written before the cosine head holds: no logit_scale, no head_version."""
    return {k: v.clone() for k, v in net.state_dict().items() if k not in NEW_KEYS}


def _old_formula(net, x: torch.Tensor) -> torch.Tensor:
    """The pre-change logits, computed by hand: <MLP(t_k), e(v)> / sqrt(D) + b_k, zero background channel first."""
    embeddings = net.unet(x)
    queries = net.prompt.query_mlp(net.prompt.class_embeddings)
    logits = torch.einsum("bdxyz,kd->bkxyz", embeddings, queries) / math.sqrt(net.prompt.embedding_dim)
    logits = logits + net.prompt.class_bias.view(1, -1, 1, 1, 1)
    return torch.cat((torch.zeros_like(logits[:, :1]), logits), 1)


# ------------------------------------------------------------------------------------------------ priors
def test_priors_count_voxels_of_the_cases_annotated_for_each_class():
    a = np.zeros((2, 5, 10), dtype=np.int8)  # 100 voxels: 10 of class 1, 5 of class 2
    a[0, 0, :] = 1
    a[1, 0, :5] = 2
    b = np.full((4, 5, 5), -1, dtype=np.int8)  # 100 voxels, nnU-Net's -1 outside the mask counts as background
    b[0, :2, :] = 1  # 10 voxels of class 1; its class 2 voxels below are not annotated in this case
    b[1, 0, :] = 2
    c = np.zeros((10, 10), dtype=np.int16)
    c[:3, :] = 3  # 30 of 100 voxels
    priors = foreground_priors([(a, (1, 2)), (b, (1,)), (c, (3, 4))], num_classes=5)
    assert priors.num_cases == 3
    assert priors.fractions[:4] == pytest.approx((20 / 200, 5 / 100, 30 / 100, 0.0))
    assert priors.priors[:4] == pytest.approx((0.1, 0.05, 0.3, 1e-4))  # absent but annotated: clamped, measured
    assert priors.measured == (True, True, True, True, False) and priors.fallback_classes == (4,)
    assert priors.priors[4] == FALLBACK_PRIOR and priors.fractions[4] is None
    full = np.ones((4, 4), dtype=np.uint8)
    assert foreground_priors([(full, (1,))], 1).priors == (0.5,)  # never starts "mostly on"

    assert subsample_evenly(["c", "a", "b"], 5) == ["a", "b", "c"]
    assert subsample_evenly([f"x{i:02d}" for i in range(10)], 3) == ["x00", "x04", "x09"]  # spread, deterministic


def test_bias_is_set_to_the_logit_of_the_prior():
    head = ClassPromptHead(sat_config(text_encoder=None))
    head.init_class_bias([0.5, 0.1, 0.01, 1e-4, 0.3])
    expected = torch.tensor([0.0, math.log(1 / 9), math.log(1 / 99), math.log(1e-4 / (1 - 1e-4)), math.log(3 / 7)])
    torch.testing.assert_close(head.class_bias.detach(), expected)
    with pytest.raises(SATConfigError, match="strictly between 0 and 1"):
        head.init_class_bias([0.5, 0.1, 0.0, 0.1, 0.1])
    with pytest.raises(SATConfigError, match="4 priors for 5 classes"):
        head.init_class_bias([0.1] * 4)


# --------------------------------------------------------------------------------------- queries and scale
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_queries_start_distinguishable(seed):
    """Text embeddings with a shared component (MiniLM: mean pairwise cosine 0.28 over the demo's 36 names) gave
    nearly parallel queries through the default-initialised MLP; centred and rescaled they do not."""
    names = tuple(f"class {i}" for i in range(12))
    config = SATConfig(names, names, "all-MiniLM-L6-v2", 384, embedding_dim=32, query_hidden_dim=256)
    embeddings = text_like_embeddings(len(names), seed, mean_cosine=0.3)
    torch.manual_seed(seed)
    head = ClassPromptHead(config)
    head.set_class_embeddings(embeddings)
    mean_new, max_new = pairwise_query_cosine(head)
    head.load_state_dict({k: v for k, v in head.state_dict().items() if k not in ("logit_scale", "head_version")})
    mean_old, _ = pairwise_query_cosine(head)
    assert mean_old > 0.9  # before: every pair of classes nearly the same query
    assert abs(mean_new) < 0.2 and max_new < 0.6


def test_initial_logits_spread_about_one_around_the_bias():
    plans, configuration = _sat_plans()
    net = sat_network(plans, configuration)
    assert net.prompt.logit_scale.requires_grad
    torch.testing.assert_close(net.prompt.logit_scale.exp().detach(), torch.tensor(math.sqrt(8.0)))  # sqrt(D)
    with torch.no_grad():
        logits = net(torch.randn(2, 1, 8, 16, 16))[:, 1:] - net.prompt.class_bias.view(1, -1, 1, 1, 1)
    assert 0.4 < float(logits.std()) < 2.0
    assert float(logits.abs().max()) <= math.sqrt(8.0) + 1e-5  # a cosine times the scale


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_from_before_the_cosine_head_loads_with_the_old_formula():
    plans, configuration = _sat_plans()
    old = sat_network(plans, configuration, seed=3)
    state = _old_state(old)
    net = sat_network(plans, configuration, seed=4)
    assert not net.prompt.legacy and set(NEW_KEYS) <= set(net.state_dict())  # new checkpoints say what they are
    assert int(net.state_dict()["prompt.head_version"]) == HEAD_VERSION
    net.load_state_dict(state, strict=True)
    assert net.prompt.legacy and int(net.prompt.head_version) == 1
    x = torch.randn(2, 1, 8, 16, 16)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), _old_formula(net, x))
        subset = net.class_logits(x, [3, 0])
    with torch.no_grad():
        torch.testing.assert_close(subset, _old_formula(net, x)[:, [4, 1]])

    resaved = net.state_dict()  # a re-saved old model stays old, and a new state makes a module new again
    again = sat_network(plans, configuration, seed=5)
    again.load_state_dict(resaved, strict=True)
    assert again.prompt.legacy
    again.load_state_dict(sat_network(plans, configuration, seed=6).state_dict(), strict=True)
    assert not again.prompt.legacy

    future = {**resaved, "prompt.head_version": torch.tensor(HEAD_VERSION + 1)}
    with pytest.raises(SATConfigError, match=f"prompt head version {HEAD_VERSION + 1} is not supported"):
        again.load_state_dict(future)
    half = {k: v for k, v in resaved.items() if k != "prompt.logit_scale"}  # one key missing is a broken file
    with pytest.raises(RuntimeError, match=r"Missing key.*prompt\.logit_scale"):
        sat_network(plans, configuration).load_state_dict(half)


def test_a_teacher_trained_before_the_change_still_loads(tmp_path):
    from nnunetv2_lorkd.teachers import load_teacher

    plans, configuration = _sat_plans()
    old = sat_network(plans, configuration, seed=7)
    old.load_state_dict(_old_state(old))  # the old network, loaded the way its checkpoint will be
    trainer = "nnUNetTrainerSATStyle"
    folder = write_model_folder(str(tmp_path / "old"), plans, configuration, dataset_json(), old, trainer)
    checkpoint = os.path.join(folder, "fold_0", "checkpoint_final.pth")
    saved = torch.load(checkpoint, weights_only=False)
    saved["network_weights"] = _old_state(old)
    torch.save(saved, checkpoint)

    teacher = load_teacher(folder, 0)
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        expected = torch.sigmoid(_old_formula(old.eval(), x)[:, [2, 5]])
    torch.testing.assert_close(teacher.probabilities(x, [CLASS_NAMES[1], CLASS_NAMES[4]]), expected)


# ---------------------------------------------------------------------------------------------- trainer
@pytest.fixture
def toy(tmp_path, monkeypatch):
    env = nnunet_env(monkeypatch, str(tmp_path))
    return write_dataset(env["nnUNet_preprocessed"])


def _trainer():
    from nnunetv2_lorkd_trainers.sat_style import nnUNetTrainerSATStyle_learnedEmbeddings

    return make_trainer(nnUNetTrainerSATStyle_learnedEmbeddings)


def _log(trainer) -> str:
    with open(trainer.log_file) as f:
        return f.read()


def test_trainer_starts_each_class_at_its_foreground_prior(toy):
    import blosc2

    trainer = _trainer()
    trainer.initialize()
    foreground, voxels = np.zeros(3), np.zeros(3)
    for case in TRAIN:  # the fold's training cases; each annotates its own region's labels only
        seg = np.asarray(blosc2.open(os.path.join(toy, "nnUNetPlans_3d_fullres", f"{case}_seg.b2nd"))[:])
        annotated = (1, 2) if case.startswith("abd") else (3,)
        for value in annotated:
            foreground[value - 1] += (seg == value).sum()
            voxels[value - 1] += seg.size
    expected = torch.logit(torch.tensor(foreground / voxels, dtype=torch.float32))
    torch.testing.assert_close(trainer.network.prompt.class_bias.detach(), expected)
    assert "class bias = logit(foreground prior) from 6 training cases" in _log(trainer)
    assert "fallback" not in _log(trainer)


def test_a_class_without_training_cases_gets_the_fallback_prior_and_says_so(toy):
    import json

    with open(os.path.join(toy, "splits_final.json"), "w") as f:  # every pelvis case in validation
        json.dump([{"train": ["abd_000", "abd_001", "abd_002"], "val": ["abd_003", "pel_000"]}], f)
    trainer = _trainer()
    trainer.initialize()
    bias = trainer.network.prompt.class_bias.detach()
    assert float(bias[2]) == pytest.approx(math.log(FALLBACK_PRIOR / (1 - FALLBACK_PRIOR)), abs=1e-6)
    assert "no training case of this fold annotates ['urinary_bladder']" in _log(trainer)
    assert float(bias[0]) < -1 and float(bias[1]) < -1  # the measured ones


def test_resuming_keeps_the_checkpoints_bias_and_old_runs_resume(toy, tmp_path):
    trainer = _trainer()
    trainer.initialize()
    with torch.no_grad():
        trainer.network.prompt.class_bias.copy_(torch.tensor([0.25, -0.5, 1.5]))
    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)

    resumed = _trainer()
    resumed.load_checkpoint(path)  # initialize() sets the prior, the checkpoint then replaces it
    torch.testing.assert_close(resumed.network.prompt.class_bias.detach(), torch.tensor([0.25, -0.5, 1.5]))
    assert not resumed.network.prompt.legacy

    # a run from before the cosine head: no new tensors in the weights, one parameter fewer in the optimiser
    old = torch.load(path, weights_only=False)
    old["network_weights"] = {k: v for k, v in old["network_weights"].items() if k not in NEW_KEYS}
    names = [n for n, _ in trainer.network.named_parameters()]
    at = names.index("prompt.logit_scale")
    assert 0 < at < len(names) - 1  # parameters after it shift by one in the old optimiser state
    group = old["optimizer_state"]["param_groups"][0]
    group["params"] = list(range(len(names) - 1))
    parameters = list(trainer.network.parameters())
    old["optimizer_state"]["state"] = {
        0: {"momentum_buffer": torch.full_like(parameters[0], 3)},
        at: {"momentum_buffer": torch.full_like(parameters[at + 1], 4)},  # the old id of the parameter after it
    }
    torch.save(old, path)
    legacy = _trainer()
    legacy.load_checkpoint(path)
    assert legacy.network.prompt.legacy
    torch.testing.assert_close(legacy.network.prompt.class_bias.detach(), torch.tensor([0.25, -0.5, 1.5]))
    state = legacy.optimizer.state_dict()
    assert len(state["param_groups"][0]["params"]) == len(names)
    assert torch.all(state["state"][0]["momentum_buffer"] == 3)  # the old momentum is kept, on its parameter
    assert torch.all(state["state"][at + 1]["momentum_buffer"] == 4) and at not in state["state"]
    legacy.on_train_start()
    legacy.train_step(next(legacy.dataloader_train))  # trains on, logit_scale included
    assert legacy.network.prompt.logit_scale.grad is not None
    legacy.on_train_end()


# -------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("seed", [0, 2])
def test_new_initialisation_segments_within_40_iterations_where_the_old_one_does_not(seed):
    """Synthetic 3-region problem (sat_helpers): within 40 iterations of nnU-Net's optimiser, some class reaches
    pseudo-Dice > 0.5 with the new initialisation; the old one predicts nothing (Dice 0 on every class) by then.
    Over 5 seeds and 1500 iterations: tests/measure_sat_init.py."""
    torch.set_num_threads(1)
    cases, val_cases = synthetic_cases(8, seed=0), synthetic_cases(3, seed=99)
    new = train_until_dice(synthetic_sat_network(seed, "new", cases), cases, val_cases, 40)
    old = train_until_dice(synthetic_sat_network(seed, "old", cases), cases, val_cases, 40)
    assert new["first_class_half"] is not None and new["first_class_half"] <= 40, new["history"]
    assert old["first_class_half"] is None and old["history"][-1][1] == 0.0, old["history"]


def test_to_legacy_is_the_old_initialisation():
    cases = synthetic_cases(1, seed=0)
    net = synthetic_sat_network(0, "old", cases)
    assert net.prompt.legacy and torch.all(net.prompt.class_bias == 0)
    to_legacy(net)  # idempotent
    assert net.prompt.legacy
