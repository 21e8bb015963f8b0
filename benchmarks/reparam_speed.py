"""Training and inference cost of rep blocks against a plain conv network, measured side by side.

For a stack of ``--blocks`` blocks at ``--channels`` channels on a ``channels x size x size`` input:

* training step (forward + backward + SGD step) in ``branches`` mode and in ``online`` mode, each as a
  ratio to the same stack of plain ``nn.Conv2d`` layers;
* memory: bytes of tensors saved for backward (deterministic, any device) and, on CUDA, peak allocated;
* inference of the fused model as a ratio to a hand-written plain conv network.

Timings are interleaved (plain, branches, online, plain, ...) and the median of ``--repeats`` is used,
so the ratios come from one run under the same conditions. Results are printed and written as JSON.

    python benchmarks/reparam_speed.py --blocks ecb repconv rrrb dbb --out bench_results/reparam_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reparam  # noqa: E402


def stack(make: Callable[[], nn.Module], n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [make(), nn.LeakyReLU(0.05)]
    return nn.Sequential(*layers[:-1])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def train_step_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
    return step


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward."""
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).square().mean()
    return total


def cuda_peak(fn: Callable[[], None], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                repeats: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(time_call(fn, device))
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", nargs="+", default=["ecb", "repconv", "rrrb", "dbb"], help="registered block names")
    ap.add_argument("--depth", type=int, default=8, help="blocks in the stack (6-8: an SR trunk's depth)")
    ap.add_argument("--channels", type=int, default=48)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="bench_results/reparam_speed.json")
    args = ap.parse_args(argv)
    for name in args.blocks:
        reparam.get_block(name)  # fail early on unknown names
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    c = args.channels
    x = torch.randn(args.batch, c, args.size, args.size, device=device)
    plain = stack(lambda: nn.Conv2d(c, c, 3, padding=1), args.depth).to(device)
    results: dict[str, object] = {
        "config": {**vars(args), "torch": torch.__version__, "machine": platform.machine(),
                   "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "blocks": {},
    }
    print(f"device={device} stack={args.depth}x{c}ch input={args.batch}x{c}x{args.size}x{args.size} "
          f"threads={torch.get_num_threads()}")
    print(f"{'block':10s} {'train br/plain':>15s} {'train online/plain':>19s} {'saved br/plain':>15s} "
          f"{'saved online/plain':>19s} {'fused infer/plain':>18s}")
    for name in args.blocks:
        cls = reparam.get_block(name)
        branches = stack(lambda: cls(c, c), args.depth).to(device).train()
        fns = {"plain": train_step_fn(plain, x), "branches": train_step_fn(branches, x)}
        online = None
        if not any(b.has_batchnorm() for b in branches.modules() if isinstance(b, reparam.RepBlock)):
            online = stack(lambda: cls(c, c), args.depth).to(device).train()
            online.load_state_dict(branches.state_dict())
            reparam.set_mode(online, "online")
            fns["online"] = train_step_fn(online, x)
        t = interleaved(fns, device, args.warmup, args.repeats)
        mem = {k: saved_bytes(m, x) for k, m in (("plain", plain), ("branches", branches), ("online", online))
               if m is not None}
        peak = {k: cuda_peak(fns[k], device) for k in fns}
        branches.eval()
        fused = reparam.fuse_all(branches)
        plain.eval()
        with torch.no_grad():
            ti = interleaved({"plain": lambda: plain(x), "fused": lambda: fused(x), "branches": lambda: branches(x)},
                             device, args.warmup, args.repeats)
        plain.train()
        row = {
            "train_s": t, "saved_bytes": mem, "cuda_peak_bytes": peak, "infer_s": ti,
            "train_branches_over_plain": t["branches"] / t["plain"],
            "train_online_over_plain": (t["online"] / t["plain"]) if "online" in t else None,
            "saved_branches_over_plain": mem["branches"] / mem["plain"],
            "saved_online_over_plain": (mem["online"] / mem["plain"]) if "online" in mem else None,
            "infer_fused_over_plain": ti["fused"] / ti["plain"],
            "infer_branches_over_plain": ti["branches"] / ti["plain"],
        }
        results["blocks"][name] = row  # type: ignore[index]

        def f(v: float | None) -> str:
            return "n/a (BN)" if v is None else f"{v:.2f}x"
        print(f"{name:10s} {f(row['train_branches_over_plain']):>15s} {f(row['train_online_over_plain']):>19s} "
              f"{f(row['saved_branches_over_plain']):>15s} {f(row['saved_online_over_plain']):>19s} "
              f"{f(row['infer_fused_over_plain']):>18s}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
