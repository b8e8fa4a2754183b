"""Cost of the per-step non-finite check (checkpoint.state_is_finite) against a training step.

    python benchmarks/nonfinite_check.py [--device cuda] [--layers 12 --dim 768]

Prints the median time of one train step (forward, backward, AdamW; bf16 autocast on
CUDA) and of one state_is_finite call over parameters + AdamW state; docs/RELIABILITY.md
quotes it (why the trainer checks every train.log_interval steps, not every step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neuroplastic.config import load_config
from neuroplastic.models import build_model
from neuroplastic.training.checkpoint import state_is_finite
from neuroplastic.training.optim import build_optimizer


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=258)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    device = torch.device(a.device)
    cfg = load_config("tiny", [f"model.n_layer={a.layers}", f"model.n_embd={a.dim}",
                               f"model.n_head={max(1, a.dim // 64)}", f"model.vocab_size={a.vocab}",
                               f"model.block_size={a.block}"])
    model = build_model(cfg.model).to(device)
    opt = build_optimizer(model, cfg.train, device)
    x = torch.randint(0, a.vocab, (a.batch, a.block), device=device)
    steps, checks = [], []
    for i in range(a.repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        _sync(device)
        t1 = time.perf_counter()
        assert state_is_finite(model, opt)
        t2 = time.perf_counter()
        if i >= 2:
            steps.append(t1 - t0)
            checks.append(t2 - t1)
    n = sum(p.numel() for p in model.parameters())
    s, c = statistics.median(steps), statistics.median(checks)
    print(f"{device.type} {torch.get_num_threads()} threads, {n / 1e6:.1f}M params, batch "
          f"{a.batch}x{a.block}: step {s * 1e3:.2f} ms, state_is_finite {c * 1e3:.3f} ms "
          f"({c / s:.2%} of a step)")


if __name__ == "__main__":
    main()
