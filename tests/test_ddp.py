"""DDP (gloo, 2 CPU processes): no unused-parameter error when a region is absent on a rank, and the
averaged gradients equal a single-process reference over the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_unet, randomize_experts
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2_lorkd.experts import add_experts, route

# per step: the region ids of rank 0's and rank 1's samples; some region is absent on a rank in every
# step, and region 2 is absent on both ranks in the last step
STEPS = [([0, 0], [1, 2]), ([2, 2], [2, 0]), ([1, 0], [0, 1])]


def _build(seed_state: dict) -> torch.nn.Module:
    net = add_experts(make_unet("plain", 2), 3, rank=2)
    net.load_state_dict(seed_state)
    return net


def _loss(outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    # deep supervision on (as nnU-Net trains), so every seg head takes part
    return sum(((o - target[..., :: 2**i, :: 2**i]) ** 2).mean() for i, o in enumerate(outputs))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 2, 16, 20, generator=gen), torch.randn(4, 3, 16, 20, generator=gen)


def _worker(rank: int, world: int, port: int, state_file: str, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = _build(torch.load(state_file, weights_only=True))
    model = DDP(net)  # find_unused_parameters=False, as nnU-Net wraps it
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step, ids in enumerate(STEPS):
        x, y = _data(step)
        local = slice(2 * rank, 2 * rank + 2)
        opt.zero_grad()
        with route(model, ids[rank]):
            loss = _loss(model(x[local]), y[local])
        loss.backward()
        opt.step()
    if rank == 0:
        torch.save({n: p.grad for n, p in net.named_parameters()} | {"params": net.state_dict()}, out_file)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path):
    net = make_unet("plain", 2)
    add_experts(net, 3, rank=2)
    randomize_experts(net)
    state_file, out_file = str(tmp_path / "init.pt"), str(tmp_path / "out.pt")
    torch.save(net.state_dict(), state_file)
    mp.spawn(_worker, args=(2, _free_port(), state_file, out_file), nprocs=2, join=True)
    ddp = torch.load(out_file, weights_only=True)

    ref = _build(torch.load(state_file, weights_only=True))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step, ids in enumerate(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        with route(ref, ids[0] + ids[1], touch_absent_experts=True):  # DDP's semantics: zero grads, not None
            loss = _loss(ref(x), y)
        loss.backward()
        opt.step()
    for name, p in ref.named_parameters():
        assert ddp[name] is not None, name
        torch.testing.assert_close(ddp[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
        if ".lora_" in name and name.rsplit(".", 1)[-1] == "2":
            assert torch.count_nonzero(ddp[name]) == 0  # region 2 is absent from the whole last step
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(ddp["params"][name], value, rtol=1e-4, atol=1e-6, msg=name)
