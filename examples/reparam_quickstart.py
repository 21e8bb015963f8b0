"""Quickstart: over-parameterize a plain conv net, train it online, fuse it back, and check it is the same network.

    python examples/reparam_quickstart.py
"""
from __future__ import annotations

import torch
from torch import nn

import reparam


def main() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.LeakyReLU(0.05), nn.Conv2d(16, 16, 3, padding=1),
                          nn.LeakyReLU(0.05), nn.Conv2d(16, 12, 3, padding=1), nn.PixelShuffle(2))
    x = torch.rand(4, 3, 24, 24)
    # 1. every 3x3 conv becomes an ECB that computes exactly the same function
    rep = reparam.repify(plain, "ecb")
    print("repified layers:", [n for n, m in rep.named_modules() if isinstance(m, reparam.RepBlock)])
    with torch.no_grad():
        print(f"repify max |diff|: {(rep(x) - plain(x)).abs().max().item():.2e}")
    # 2. fine-tune in online mode: one conv per block per step, same gradients as the branches
    reparam.set_mode(rep, "online")
    opt = torch.optim.Adam(rep.parameters(), lr=1e-3)
    target = torch.rand(4, 3, 48, 48)
    for step in range(20):
        opt.zero_grad()
        loss = (rep(x) - target).abs().mean()
        loss.backward()
        opt.step()
    print(f"after 20 online steps: L1 = {loss.item():.4f}")
    # 3. fuse back to plain convs and verify against the multi-branch forward
    reparam.set_mode(rep, "branches")
    rep.eval()
    fused = reparam.fuse_all(rep)
    with torch.no_grad():
        err = (fused(x) - rep(x)).abs().max().item() / rep(x).abs().max().item()
    print(f"fused model: {sum(isinstance(m, nn.Conv2d) for m in fused.modules())} plain convs, "
          f"relative error vs multi-branch form {err:.2e}")
    assert err <= 1e-5


if __name__ == "__main__":
    main()
