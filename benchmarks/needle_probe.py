"""Does needle recall emerge? A small, fast probe of the training signal.

Trains a byte-level model (``--arch hebbian`` or ``gpt``) on freshly drawn needle documents
(:func:`neuroplastic.data.recall_tasks.needle_example`, packed with an end-of-text token),
with the answer tokens' loss weighted ``--answer-weight`` times, and reports every
``--eval-every`` steps, per haystack length, the exact-recall rate (all 4 key digits right
under teacher forcing = greedy decoding gets the key) and the per-digit accuracy (chance:
0.1). Used to choose the recipe of the needle acceptance run; results in
docs/BENCHMARKS.md (section "needle").

    python benchmarks/needle_probe.py --arch hebbian --rule delta --conv 4 --steps 600
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn.functional as F

from neuroplastic.config import ModelConfig
from neuroplastic.data import recall_tasks
from neuroplastic.models import build_model
from neuroplastic.recipes.recall import recall_batch

EOT = 256


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="hebbian", choices=["hebbian", "gpt"])
    p.add_argument("--rule", default="delta", choices=["hebbian", "delta"])
    p.add_argument("--feature-map", default="identity_l2")
    p.add_argument("--conv", type=int, default=4, help="model.conv_size")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embd", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--memory-heads", type=int, default=0)
    p.add_argument("--conv-init", default="random", choices=["random", "shift"])
    p.add_argument("--memory-qkv", default="shared", choices=["shared", "own"])
    p.add_argument("--beta-bias", type=float, default=None, help="model.beta_bias")
    p.add_argument("--decay-init", type=float, default=None, help="model.decay_logit_init (one value)")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--block", type=int, default=512, help="training block (bytes)")
    p.add_argument("--min-bytes", type=int, default=128)
    p.add_argument("--max-bytes", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--answer-weight", type=float, default=10.0)
    p.add_argument("--needles", type=int, default=1,
                   help="needles per training document, drawn from 1..N (multi_needle_document)")
    p.add_argument("--long-steps", type=int, default=0,
                   help="then this many steps on --long-min..--long-max byte documents in "
                        "blocks of --long-block (same bytes per step)")
    p.add_argument("--long-min", type=int, default=512)
    p.add_argument("--long-max", type=int, default=2048)
    p.add_argument("--long-block", type=int, default=2048)
    p.add_argument("--save", default="", help="save the final model state_dict + config here")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-lengths", default="512,1024,2048")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = ModelConfig.from_flat(
        arch=a.arch, vocab_size=257, block_size=4096, n_layer=a.layers, n_head=a.heads,
        n_embd=a.embd, window=a.window, memory_rule=a.rule, feature_map=a.feature_map,
        memory_heads=a.memory_heads, conv_size=a.conv,
        conv_init=a.conv_init, memory_qkv=a.memory_qkv,
        decay_logit_init=[] if a.decay_init is None else [a.decay_init], beta_bias=a.beta_bias, chunk_size=64, pos="rope", dropout=0.0,
    )
    model = build_model(cfg)
    print(f"{a.arch}: {sum(q.numel() for q in model.parameters()):,} parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
    rng = random.Random(a.seed)

    erng = random.Random(12345)
    evals = {
        n: [recall_tasks.needle_example(n, d, rng=erng) for d in (0, 0.25, 0.5, 0.75, 1) for _ in range(4)]
        for n in map(int, a.eval_lengths.split(","))
    }

    @torch.no_grad()
    def evaluate() -> dict[int, tuple[float, float]]:
        model.eval()
        out = {}
        for n, examples in evals.items():
            exact = digits = 0.0
            pos = torch.zeros(4)
            for prompt, answer in examples:
                x = torch.tensor([list((prompt + answer).encode())])
                logits, _ = model(x[:, :-1])
                la = len(answer.encode())
                pred, gold = logits[0, -la:].argmax(-1), x[0, -la:]
                exact += float(torch.equal(pred, gold))
                digits += (pred[1:] == gold[1:]).float().mean().item()
                pos += (pred[1:] == gold[1:]).float()
            out[n] = (exact / len(examples), round(digits / len(examples), 2),
                      "/".join(f"{v:.2f}" for v in (pos / len(examples)).tolist()))
        model.train()
        return out

    t0 = time.time()
    total = a.steps + a.long_steps
    for step in range(1, total + 1):
        lr = a.lr * min(1.0, step / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / total)))
        for group in opt.param_groups:
            group["lr"] = lr
        if step <= a.steps:
            rows, size, lo, hi = a.batch, a.block, a.min_bytes, a.max_bytes
        else:
            rows, size = max(1, a.batch * a.block // a.long_block), a.long_block
            lo, hi = a.long_min, a.long_max
        x, y, w = recall_batch(rng, rows, size, lo, hi, a.needles, a.answer_weight, EOT)
        logits, _ = model(x)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        loss = (nll * w.reshape(-1)).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0:
            res = " ".join(f"{n}B: exact {e:.2f} digits {d:.2f} ({p})" for n, (e, d, p) in evaluate().items())
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s | {res}", flush=True)
    if a.save:
        torch.save({"config": cfg, "model": model.state_dict()}, a.save)


if __name__ == "__main__":
    main()
