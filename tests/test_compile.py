"""torch.compile with routing (CPU): a compiled routed network equals the eager one (outputs and gradients), a new
region mix never recompiles (routing reaches the graph as a tensor), and the trainers compile where nnU-Net would,
on request on CPU, and say so in the log."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from kd_toy import make_trainer, nnunet_env, write_dataset
from nnunetv2_lorkd_trainers.lorkd import nnUNetTrainerLoRKD
from nnunetv2_lorkd_trainers.mtl import nnUNetTrainerMTL
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from nnunetv2_lorkd.experts import add_experts, backbone_only, expert_layers, route, set_routing

NUM_REGIONS = 3


def _network(dim: int) -> nn.Module:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    net = PlainConvUNet(1, 3, (4, 8, 16), conv, 3, (1, 2, 2), 2, 3, (1, 1), True, norm, {"affine": True}, None,
                        None, nn.LeakyReLU, {"inplace": True}, deep_supervision=True)  # fmt: skip
    add_experts(net, NUM_REGIONS, rank=2, include_transposed=True)
    with torch.no_grad():  # experts that differ from each other and from the backbone
        for layer in expert_layers(net):
            for b in layer.lora_B:
                b.normal_(std=0.2)
    return net.double()


def _forward_backward(net: nn.Module, x: torch.Tensor, region_ids) -> tuple[list, torch.Tensor, dict]:
    for p in net.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    with route(net, region_ids):
        out = net(x)
    sum((o * o).sum() for o in out).backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in net.named_parameters()}
    return [o.detach() for o in out], x.grad, grads


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dim", [2, 3])
def test_compiled_routing_equals_eager_and_one_graph_serves_every_region_mix(dim: int) -> None:
    torch.manual_seed(0)
    net = _network(dim)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(net, backend=counter)
    x = torch.randn(4, 1, *((16,) * dim), dtype=torch.float64)
    # grouped, interleaved, one region, every region: the same batch size and mode, so the same graph
    for region_ids in ([0, 1, 1, 2], [2, 0, 2, 1], [1, 1, 1, 1], [0, 0, 2, 2], [2, 1, 0, 1]):
        eager_out, eager_dx, eager_grads = _forward_backward(net, x, region_ids)
        out, dx, grads = _forward_backward(compiled, x, region_ids)
        for a, b in zip(eager_out, out, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        torch.testing.assert_close(dx, eager_dx, rtol=0, atol=1e-5)
        for name, grad in grads.items():
            if eager_grads[name] is None:  # an absent region's expert: no gradient eagerly, an exact zero compiled
                assert ".lora_" in name and int(name.rsplit(".", 1)[-1]) not in region_ids
                assert grad is not None and not grad.any(), name
            else:
                torch.testing.assert_close(grad, eager_grads[name], rtol=0, atol=1e-5)
        assert counter.frame_count == 1, f"recompiled for the region mix {region_ids}"

    # one region for every sample (what prediction does), in inference: one more graph, whatever the region
    net.eval()
    with torch.no_grad():
        for region in range(NUM_REGIONS):
            set_routing(net, region)
            torch.testing.assert_close(compiled(x[:1]), net(x[:1]), rtol=0, atol=1e-5)
        set_routing(net, None)
        assert counter.frame_count == 2
        with backbone_only(net):
            expected = net(x[:1])
        with backbone_only(compiled):
            torch.testing.assert_close(compiled(x[:1]), expected, rtol=0, atol=1e-5)
    assert counter.frame_count == 3


def test_compiled_routing_still_refuses_a_forward_without_routing() -> None:
    net = _network(2)
    compiled = torch.compile(net, backend="aot_eager")
    with pytest.raises(Exception, match="was called without routing"):
        compiled(torch.randn(2, 1, 16, 16, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("dim", [2, 3])
def test_inductor_compiled_routed_training_step_equals_eager(dim: int) -> None:
    """The default backend (inductor, C++ code generation on CPU): forward and gradients within 1e-5."""
    torch.manual_seed(1)
    net = _network(dim).float()
    compiled = torch.compile(net)
    x = torch.randn(4, 1, *((16,) * dim))
    graphs = []
    for region_ids in ([0, 1, 1, 2], [2, 2, 0, 1]):
        eager_out, _, eager_grads = _forward_backward(net, x, region_ids)
        out, _, grads = _forward_backward(compiled, x, region_ids)
        for a, b in zip(eager_out, out, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        # float32 sums in another order: gradients within 1e-5 of the largest gradient of the step
        scale = max(g.abs().max().item() for g in eager_grads.values() if g is not None)
        for name, grad in grads.items():
            reference = eager_grads[name]
            torch.testing.assert_close(grad, torch.zeros_like(grad) if reference is None else reference,
                                       rtol=0, atol=1e-5 * scale, msg=name)  # fmt: skip
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]  # the second mix reused the first one's graph


# ------------------------------------------------------------------------------------------------- trainers
@pytest.fixture
def toy(tmp_path, monkeypatch):
    env = nnunet_env(monkeypatch, str(tmp_path))
    return write_dataset(env["nnUNet_preprocessed"])


def _log(trainer) -> str:
    with open(trainer.log_file) as f:
        return f.read()


@pytest.mark.parametrize(
    ("setting", "compiles", "reason"),
    [
        (None, False, "off (CPU: set nnUNet_compile=t to compile here)"),
        ("t", True, "on (nnUNet_compile is set; on CPU nnU-Net itself never compiles)"),
        ("false", False, "off (nnUNet_compile=false)"),
    ],
)
def test_the_trainers_compile_on_request_on_cpu_and_log_why(toy, monkeypatch, setting, compiles, reason) -> None:
    if setting is None:
        monkeypatch.delenv("nnUNet_compile", raising=False)
    else:
        monkeypatch.setenv("nnUNet_compile", setting)
    for trainer_class in (nnUNetTrainerLoRKD, nnUNetTrainerMTL):
        trainer = make_trainer(trainer_class)
        assert trainer._do_i_compile() is compiles
        assert trainer._do_i_compile() is compiles
        assert _log(trainer).count(f"torch.compile: {reason}") == 1  # said once, however often nnU-Net asks

    class NeverCompiled(nnUNetTrainerLoRKD):
        lorkd_compile = False

    trainer = make_trainer(NeverCompiled)
    assert trainer._do_i_compile() is False
    assert "torch.compile: off (NeverCompiled.lorkd_compile is False)" in _log(trainer)


@pytest.mark.slow
def test_a_short_compiled_lorkd_training_run(toy, monkeypatch) -> None:
    """nnU-Net's own initialize compiles the network (inductor); mixed-region training steps, a validation step and
    the eager network agree, and the region mixes of later steps add no graph."""
    monkeypatch.setenv("nnUNet_compile", "t")
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = make_trainer(nnUNetTrainerLoRKD)
    trainer.initialize()
    assert type(trainer.network).__name__ == "OptimizedModule"
    trainer.on_train_start()
    losses = []
    for step in range(3):
        batch = next(trainer.dataloader_train)
        losses.append(float(trainer.train_step(batch)["loss"]))
        if step == 0:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # new mixes, no new graph

    trainer.network.eval()
    batch = next(trainer.dataloader_val)
    data = batch["data"].to(trainer.device)
    region_ids = trainer.region_map.region_ids(batch["keys"])
    with torch.no_grad(), route(trainer.network, region_ids):
        compiled = trainer.network(data)
    with torch.no_grad(), route(trainer.network._orig_mod, region_ids):
        eager = trainer.network._orig_mod(data)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    trainer.validation_step(batch)
    trainer.on_train_end()
