"""The distillation target and loss: hand-computed cases (float64), the derivation checked by brute force, the
partial-label restriction, deep supervision, and where the KD gradients go."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import make_unet, randomize_experts

from nnunetv2_lorkd.experts import add_experts, expert_layers, route
from nnunetv2_lorkd.kd import DistillationLoss, RegionClassLayout, SegmentationDistillationLoss, target_distribution
from nnunetv2_lorkd.kd.targets import pool_to
from nnunetv2_lorkd.losses import DeepSupervisionPartialLoss, PartialLabelDiceCELoss
from nnunetv2_lorkd.regions import RegionMap

DTYPE = torch.float64


def region_map(regions: list[tuple[str, list[str]]], labels: dict[str, int]) -> RegionMap:
    return RegionMap.from_dataset_json(
        {
            "labels": {"background": 0, **labels},
            "lorkd": {"regions": [{"name": n, "labels": ls} for n, ls in regions], "case_regions": {}},
        }
    )


# union channels: 0 background, 1 a, 2 b, 3 c; region 0 = {a, b}, region 1 = {c}
RMAP = region_map([("r0", ["a", "b"]), ("r1", ["c"])], {"a": 1, "b": 2, "c": 3})
LAYOUT = RegionClassLayout.from_region_map(RMAP)
MASK = torch.tensor(RMAP.class_mask(4), dtype=torch.bool)


def one_voxel(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=DTYPE).view(1, -1, 1, 1, 1)


def kd_one_voxel(z: list[float], p: list[float], region: int, exclusive: bool, tau: float) -> float:
    loss = DistillationLoss(LAYOUT, exclusive, tau)
    return float(loss(one_voxel(z), one_voxel(p), [region], MASK[[region]]))


def test_hand_computed_sigmoid_teacher():
    # teacher p = (0.8, 0.1) for (a, b); tau = 2: target logits [0, log 4, -log 9] / 2 = [0, log 2, -log 3]
    # -> q proportional to (1, 2, 1/3) = (0.3, 0.6, 0.1)
    q = [0.3, 0.6, 0.1]
    # student z = (bg 0.5, a 1.0, b -0.3, c 2.0); c is not annotated in region 0 and is left out (the fused
    # region-0 model has no channel c): z/tau over (bg, a, b) = (0.25, 0.5, -0.15) -> r = softmax of that
    r = [math.exp(0.25), math.exp(0.5), math.exp(-0.15)]
    r = [v / sum(r) for v in r]
    expected = 4.0 * sum(qi * math.log(qi / ri) for qi, ri in zip(q, r, strict=True))
    got = kd_one_voxel([0.5, 1.0, -0.3, 2.0], [0.8, 0.1], 0, exclusive=False, tau=2.0)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_hand_computed_softmax_teacher():
    # exclusive teacher p = (0.5, 0.2): m = (none of the region's classes 0.3, a 0.5, b 0.2); tau = 2 -> q
    # proportional to sqrt(m); the student's c logit (2.0) is left out as above
    m = [0.3, 0.5, 0.2]
    q = [math.sqrt(v) for v in m]
    q = [v / sum(q) for v in q]
    r = [math.exp(0.25), math.exp(0.5), math.exp(-0.15)]
    r = [v / sum(r) for v in r]
    expected = 4.0 * sum(qi * math.log(qi / ri) for qi, ri in zip(q, r, strict=True))
    got = kd_one_voxel([0.5, 1.0, -0.3, 2.0], [0.5, 0.2], 0, exclusive=True, tau=2.0)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_tau_one_sigmoid_target_is_the_conditional_distribution_of_independent_bernoullis():
    """q_c = P(only class c | at most one class present), q_bg = P(none | at most one), enumerated over all
    2^K outcomes of independent Bernoullis."""
    p = torch.tensor([0.7, 0.2, 0.55], dtype=DTYPE)
    weight = {}
    for outcome in itertools.product([0, 1], repeat=3):
        if sum(outcome) <= 1:
            prob = math.prod(float(pi) if o else 1 - float(pi) for pi, o in zip(p, outcome, strict=True))
            weight[outcome.index(1) + 1 if 1 in outcome else 0] = prob
    expected = torch.tensor([weight[k] for k in range(4)], dtype=DTYPE) / sum(weight.values())
    got = target_distribution(p.view(1, 3, 1), torch.ones(1, 4, dtype=torch.bool), exclusive=False, temperature=1.0)
    torch.testing.assert_close(got.view(-1), expected, rtol=1e-12, atol=1e-14)


def test_target_is_a_distribution_and_clamps_extremes():
    p = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=DTYPE).view(2, 2, 1)
    valid = torch.ones(2, 3, dtype=torch.bool)
    for exclusive in (False, True):
        q = target_distribution(p, valid, exclusive, temperature=1.0)
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q.sum(1), torch.ones(2, 1, dtype=DTYPE))


def test_zero_when_student_matches_target_and_padding_is_ignored():
    # region 1 has one class; the teacher's second channel is padding and must not matter
    tau = 1.5
    q = target_distribution(one_voxel([0.35]).view(1, 1, 1, 1, 1), torch.ones(1, 2, dtype=torch.bool), False, tau)
    # a student whose tempered distribution over (bg, c) equals q; a and b (region 0) are left out, however
    # high they score
    z = torch.tensor([0.0, 30.0, 25.0, 0.0], dtype=DTYPE)
    z[3] = tau * math.log(float(q[0, 1] / q[0, 0]))
    base = kd_one_voxel(z.tolist(), [0.35, 0.0], 1, False, tau)
    assert abs(base) < 1e-12
    assert kd_one_voxel(z.tolist(), [0.35, 0.93], 1, False, tau) == pytest.approx(base, abs=1e-14)


@pytest.mark.parametrize("exclusive", [False, True])
def test_other_regions_classes_do_not_enter_and_get_no_gradient(exclusive: bool):
    """The KD term of a region-0 voxel ignores class c's logit (the deployed region-0 model has no channel c)
    and gives it exactly zero gradient; the background logit is the raw one, not merged with c."""
    p, tau = [0.6, 0.3], 1.3
    a = kd_one_voxel([0.2, 1.0, -0.5, 0.7], p, 0, exclusive, tau)
    assert kd_one_voxel([0.2, 1.0, -0.5, 9.0], p, 0, exclusive, tau) == pytest.approx(a, rel=1e-12)
    assert kd_one_voxel([0.2, 1.0, -0.5, -9.0], p, 0, exclusive, tau) == pytest.approx(a, rel=1e-12)
    assert kd_one_voxel([1.2, 1.0, -0.5, 0.7], p, 0, exclusive, tau) != pytest.approx(a, rel=1e-6)
    z = one_voxel([0.2, 1.0, -0.5, 0.7]).requires_grad_()
    DistillationLoss(LAYOUT, exclusive, tau)(z, one_voxel(p), [0], MASK[[0]]).backward()
    assert float(z.grad[0, 3]) == 0.0 and float(z.grad[0, :3].abs().sum()) > 0
    # d/dz of tau^2 * KL(q || softmax(z / tau)) over (bg, a, b) is tau * (r - q)
    q = target_distribution(one_voxel(p).view(1, 2, 1), torch.ones(1, 3, dtype=torch.bool), exclusive, tau)
    r = torch.softmax(torch.tensor([0.2, 1.0, -0.5], dtype=DTYPE) / tau, 0)
    torch.testing.assert_close(z.grad[0, :3].view(-1), tau * (r - q.view(-1)), rtol=1e-12, atol=1e-14)


def test_deep_supervision_uses_weights_and_area_averaged_targets():
    gen = torch.Generator().manual_seed(1)
    outputs = [
        torch.randn(2, 4, 4, 8, 8, generator=gen, dtype=DTYPE),
        torch.randn(2, 4, 2, 4, 4, generator=gen, dtype=DTYPE),
    ]
    probs = torch.rand(2, 2, 4, 8, 8, generator=gen, dtype=DTYPE)
    regions = [0, 1]
    mask = MASK[regions]
    weights = [0.7, 0.3]
    total = DistillationLoss(LAYOUT, False, 2.0, weights)(outputs, probs, regions, mask)
    _, valid = LAYOUT.index_and_valid(regions, torch.device("cpu"))
    q = target_distribution(probs, valid, False, 2.0)
    manual = 0.0
    for w, out in zip(weights, outputs, strict=True):
        q_level = pool_to(q, tuple(out.shape[2:]))
        torch.testing.assert_close(q_level.sum(1), torch.ones_like(q_level[:, 0]))  # still a distribution
        per_sample = []
        for b, region in enumerate(regions):
            # a softmax over background + the region's classes only, the other classes left out
            student = torch.log_softmax(out[b, list(LAYOUT.channels[region])] / 2.0, 0)
            qb = q_level[b, : len(student)]
            per_sample.append((qb * (torch.log(qb) - student)).sum(0).mean())
        manual += w * 4.0 * float(torch.stack(per_sample).mean())
    assert float(total) == pytest.approx(manual, rel=1e-10)


def test_combined_loss_is_seg_plus_weighted_kd_and_seg_alone_without_teacher():
    gen = torch.Generator().manual_seed(2)
    out = torch.randn(2, 4, 4, 8, 8, generator=gen)
    target = torch.randint(0, 3, (2, 1, 4, 8, 8), generator=gen)
    target[1][target[1] > 0] = 3  # region 1 has only class c
    probs = torch.rand(2, 2, 4, 8, 8, generator=gen)
    seg = DeepSupervisionPartialLoss(PartialLabelDiceCELoss(batch_dice=False))
    loss = SegmentationDistillationLoss(seg, DistillationLoss(LAYOUT, False, 1.0), weight=0.5)
    loss.set_class_mask(MASK[[0, 1]])
    plain = loss(out, target)
    loss.set_teacher(probs, [0, 1])
    combined = loss(out, target)
    kd = DistillationLoss(LAYOUT, False, 1.0)(out, probs, [0, 1], MASK[[0, 1]])
    torch.testing.assert_close(combined, plain + 0.5 * kd)
    torch.testing.assert_close(loss.last_distillation, kd)
    loss.set_teacher(None)
    torch.testing.assert_close(loss(out, target), plain)
    assert loss.last_distillation is None
    with pytest.raises(ValueError, match="weight must be > 0"):
        SegmentationDistillationLoss(seg, DistillationLoss(LAYOUT, False, 1.0), weight=0.0)


def test_kd_gradients_reach_backbone_and_only_present_experts():
    net = make_unet("plain", 3, num_classes=4)
    add_experts(net, 3, rank=2)
    randomize_experts(net)
    x = torch.randn(2, 2, 8, 16, 16)
    regions = [0, 2]  # expert 1 absent
    rmap = region_map([("r0", ["a", "b"]), ("r1", ["c"]), ("r2", ["c"])], {"a": 1, "b": 2, "c": 3})
    layout = RegionClassLayout.from_region_map(rmap)
    mask = torch.tensor(rmap.class_mask(4), dtype=torch.bool)[regions]
    probs = torch.rand(2, 2, 8, 16, 16)
    net.train()
    with route(net, regions):
        outputs = net(x)
    kd = DistillationLoss(layout, False, 2.0, [0.6, 0.4])(outputs, probs, regions, mask)
    kd.backward()
    layers = expert_layers(net)

    def grad_sum(p: torch.Tensor) -> float:  # an absent expert gets no gradient (None) or an exact zero
        return 0.0 if p.grad is None else float(p.grad.abs().sum())

    grad = {t: sum(grad_sum(layer.lora_A[t]) + grad_sum(layer.lora_B[t]) for layer in layers) for t in range(3)}
    assert grad[0] > 0 and grad[2] > 0
    assert grad[1] == 0.0
    backbone = [p for n, p in net.named_parameters() if ".lora_" not in n and p.grad is not None]
    assert backbone and sum(float(p.grad.abs().sum()) for p in backbone) > 0
