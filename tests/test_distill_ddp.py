"""Two-process DDP (gloo, loopback) distillation: both ranks must end with bit-identical weights.

The processes are spawned by the test itself (no torchrun needed), bound to 127.0.0.1 and a free port, and
killed if they do not finish within the deadline.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import distill

WORLD = 2
DEADLINE_S = 120.0  # hard bound; a healthy run takes a few seconds plus interpreter start-up


class Net(nn.Module):
    def __init__(self, nf: int) -> None:
        super().__init__()
        self.input_range, self.scale = 1.0, 2
        self.head = nn.Conv2d(3, nf, 3, padding=1)
        self.B1 = nn.Sequential(nn.Conv2d(nf, nf, 3, padding=1), nn.ReLU())
        self.B2 = nn.Sequential(nn.Conv2d(nf, nf, 3, padding=1), nn.ReLU())
        self.tail = nn.Sequential(nn.Conv2d(nf, 12, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        return self.tail(self.B2(self.B1(f)) + f)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    ctx = distill.ddp.init_from_env(backend="gloo", device="cpu", timeout_s=60)
    out: dict[str, object] = {"rank": ctx.rank, "world": ctx.world_size}
    try:
        torch.manual_seed(123)
        teacher = Net(8)
        teacher_before = distill.ddp.flat_parameters(teacher)
        torch.manual_seed(1000 + rank)  # a different init per rank: DDP must start everyone from rank 0's
        student = Net(4)
        g = torch.Generator().manual_seed(7)
        lr = torch.rand(16, 3, 8, 8, generator=g)
        data = torch.utils.data.TensorDataset(lr, torch.rand(16, 3, 16, 16, generator=g))

        # 1) features + teacher output + ground truth: every parameter (student and adapters) gets a gradient.
        d = distill.Distiller(teacher, student, pairs=[("B1", "B1", 1.0), ("B2", "B2", 0.5)], gt_weight=1.0)
        out["init"] = distill.ddp.flat_parameters(d)
        res = distill.train_steps(d, data, steps=3, batch_size=2, ctx=ctx, progress=False, log_every=1,
                                  checkpoint=Path(out_dir) / "ckpt.pt",
                                  optimizer_fn=lambda p: torch.optim.Adam(p, 1e-2))
        out["final"] = distill.ddp.flat_parameters(d)
        out["same"] = distill.ddp.same_on_all_ranks(d)
        out["local_losses"] = [h["loss"] for h in res.history]
        out["teacher_unchanged"] = torch.equal(teacher_before, distill.ddp.flat_parameters(teacher))
        d.close()

        # 2) features only: the tail gets no gradient; wrap() must turn on find_unused_parameters by itself.
        d2 = distill.Distiller(teacher, student, pairs=[("B1", "B1", 1.0)], output_weight=0.0)
        out["unused"] = list(d2.unused_parameters)
        tail_before = distill.ddp.flat_parameters(student.tail)
        distill.train_steps(d2, data, steps=2, batch_size=2, ctx=ctx, progress=False)
        out["final2"] = distill.ddp.flat_parameters(d2)
        out["same2"] = distill.ddp.same_on_all_ranks(d2)
        out["tail_unchanged"] = torch.equal(tail_before, distill.ddp.flat_parameters(student.tail))
        d2.close()
    finally:
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        distill.ddp.cleanup(ctx)


@pytest.mark.slow
def test_two_process_gloo_ddp_identical_weights(tmp_path):
    port = _free_port()
    context = mp.start_processes(_worker, args=(WORLD, port, str(tmp_path)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {DEADLINE_S:.0f} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    r0, r1 = results
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, WORLD)
    # Each rank started from its own random init and saw its own shard of the data...
    assert not torch.equal(r0["init"], r1["init"])
    assert r0["local_losses"][0] != r1["local_losses"][0]
    # ...yet DDP (broadcast at wrap, gradient all-reduce each step) leaves bit-identical weights that moved.
    assert torch.equal(r0["final"], r1["final"]) and r0["same"] and r1["same"]
    assert not torch.equal(r0["final"], r0["init"])
    assert r0["teacher_unchanged"] and r1["teacher_unchanged"]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3
    flat_ckpt = torch.cat([v.reshape(-1).double() for v in ckpt["model"].values()])
    assert torch.equal(flat_ckpt, r0["final"])  # rank 0 wrote what every rank holds
    # Feature-only phase: unused parameters detected, still identical across ranks, tail untouched.
    assert r0["unused"] and all(n.startswith(("student.B2", "student.tail")) for n in r0["unused"])
    assert torch.equal(r0["final2"], r1["final2"]) and r0["same2"] and r1["same2"]
    assert r0["tail_unchanged"] and r1["tail_unchanged"]
