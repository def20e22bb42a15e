"""Routing, fusion, gradient separation, distillation and the frozen teacher."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from cls_helpers import one_torch_thread, randomize, tiny_model

from nnunetv2_lorkd.classification.data import MultiTaskSplit
from nnunetv2_lorkd.classification.losses import kd_kl, multitask_loss
from nnunetv2_lorkd.classification.models import FrozenTeacher, fuse_task
from nnunetv2_lorkd.classification.train import TrainSettings, load_checkpoint, save_checkpoint, train_model
from nnunetv2_lorkd.experts import ExpertLayer, expert_layers


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def _batch(n: int = 10, channels: int = 1, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 255


MIXED_IDS = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 1, 2])


def test_every_groups1_conv_gets_one_expert_per_task() -> None:
    model = tiny_model()
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    layers = expert_layers(model.backbone)
    assert len(layers) == len(convs) > 0  # stem, block convs and the 1x1 shortcut
    assert all(layer.num_experts == 3 and layer.ranks == (2, 2, 2) for layer in layers)
    assert not any(isinstance(h, ExpertLayer) for h in model.heads)


def test_mixed_batch_is_one_forward_and_each_sample_uses_its_own_head() -> None:
    model = randomize(tiny_model()).eval()
    calls = []
    stem = expert_layers(model.backbone)[0]
    stem.register_forward_hook(lambda *_: calls.append(1))
    x = _batch()
    groups = model(x, MIXED_IDS)
    assert len(calls) == 1  # one routed forward for the whole mixed batch
    assert [g.task for g in groups] == [0, 1, 2]
    for g in groups:
        assert g.logits.shape == (len(g.index), len(model.heads[g.task].bias))
        assert torch.equal(MIXED_IDS[g.index], torch.full((len(g.index),), g.task))
        # the same samples run alone through their task give the same logits (eval: BN uses running stats)
        alone = model.task_logits(x[g.index], g.task)
        torch.testing.assert_close(g.logits, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", [0, 1, 2])
def test_routed_output_equals_fused_plain_model(task: int) -> None:
    model = randomize(tiny_model()).eval()
    plain = fuse_task(model, task).eval()
    assert not any(isinstance(m, ExpertLayer) for m in plain.modules())
    assert {type(m) for m in plain.backbone.modules()} <= {
        type(m) for m in tiny_model(experts=False).backbone.modules()
    }
    x = _batch()
    routed = {g.task: (g.index, g.logits) for g in model(x, MIXED_IDS)}
    index, logits = routed[task]
    with torch.no_grad():
        fused = plain(x[index])
    assert (logits - fused).abs().max().item() <= 1e-5
    # experts are non-trivial: the fused network differs from the shared backbone
    other = fuse_task(model, (task + 1) % 3).eval()
    with torch.no_grad():
        assert (other.backbone(x) - plain.backbone(x)).abs().max().item() > 1e-3


def test_absent_task_experts_get_exactly_zero_gradient_from_the_task_loss() -> None:
    model = randomize(tiny_model()).train()
    ids = torch.tensor([0, 2, 0, 2, 2, 0])
    labels = torch.tensor([0, 1, 2, 0, 1, 1])
    loss = multitask_loss(model(_batch(6), ids), labels).total
    loss.backward()
    for layer in expert_layers(model.backbone):
        for t in range(3):
            grads = [layer.lora_A[t].grad, layer.lora_B[t].grad]
            if t == 1:  # absent from the batch: no gradient at all outside DDP (the optimiser skips it)
                assert all(g is None for g in grads), layer.lorkd_name
        assert torch.count_nonzero(layer.lora_B[0].grad) > 0 and torch.count_nonzero(layer.lora_B[2].grad) > 0
    assert model.heads[1].weight.grad is None or torch.count_nonzero(model.heads[1].weight.grad) == 0


def test_kd_gives_the_student_gradient_and_the_teacher_none() -> None:
    teacher = FrozenTeacher(randomize(tiny_model(experts=False, arch={"widths": [8, 8], "blocks": [1, 1]}), seed=3))
    student = randomize(tiny_model()).train()
    x = _batch(8)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    s_out, t_out = student(x, ids), teacher(x, ids)
    assert all(not g.logits.requires_grad for g in t_out)
    kd_only = sum(len(s.index) / 8 * kd_kl(s.logits, t.logits, 4.0) for s, t in zip(s_out, t_out, strict=True))
    kd_only.backward()
    grads = [p.grad for p in student.backbone.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # the combined loss adds exactly kd_weight * KD on top of the task CE
    labels = torch.zeros(8, dtype=torch.long)
    with torch.no_grad():
        s_out = student(x, ids)
        with_kd = multitask_loss(s_out, labels, t_out, kd_weight=0.5, temperature=4.0)
    torch.testing.assert_close(with_kd.total, with_kd.ce + 0.5 * with_kd.kd)
    torch.testing.assert_close(with_kd.kd, kd_only.detach(), rtol=1e-4, atol=1e-6)


def test_kd_kl_matches_the_formula_and_scales_with_tau_squared() -> None:
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    tau = 3.0
    p_t = torch.softmax(t / tau, 1)
    manual = (p_t * (torch.log(p_t) - torch.log_softmax(s / tau, 1))).sum(1).mean() * tau**2
    torch.testing.assert_close(kd_kl(s, t, tau), manual)
    assert float(kd_kl(t, t, tau)) == pytest.approx(0.0, abs=1e-6)


def test_multitask_loss_weights_each_task_by_its_share_of_the_batch() -> None:
    model = tiny_model(experts=False).eval()
    x, ids = _batch(6), torch.tensor([0, 0, 0, 0, 1, 2])
    labels = torch.tensor([0, 1, 2, 0, 1, 3])
    groups = model(x, ids)
    expected = sum(len(g.index) / 6 * torch.nn.functional.cross_entropy(g.logits, labels[g.index]) for g in groups)
    torch.testing.assert_close(multitask_loss(groups, labels).total, expected)


def test_teacher_stays_frozen_through_student_training() -> None:
    teacher_model = randomize(tiny_model(experts=False), seed=5)
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    teacher = FrozenTeacher(teacher_model)
    teacher.train()  # cannot unfreeze
    assert not teacher.training and not teacher_model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    student = tiny_model()
    n = 24
    data = MultiTaskSplit((torch.rand(n, 1, 12, 12) * 255).to(torch.uint8), torch.arange(n) % 2, torch.arange(n) % 3)
    history = train_model(
        student,
        data,
        TrainSettings(epochs=2, batch_size=8, progress=False),
        torch.device("cpu"),
        teacher=teacher,
        log=lambda _s: None,
    )
    after = teacher_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats unchanged
    assert all(h["kd_weight"] == 1.0 and h["kd"] > 0 for h in history)  # KD on by default and logged


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path) -> None:
    model = randomize(tiny_model()).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, "student", [{"epoch": 1, "loss": 0.5}])
    payload = torch.load(path, weights_only=True)
    assert payload["config"]["experts"] == {"rank": 2, "alpha": 8.0}
    loaded, _ = load_checkpoint(path)
    x = _batch()
    for a, b in zip(model(x, MIXED_IDS), loaded(x, MIXED_IDS), strict=True):
        assert torch.equal(a.logits, b.logits)


def test_wrong_number_of_task_ids_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="one task id per image"):
        tiny_model()(_batch(4), [0, 1])
