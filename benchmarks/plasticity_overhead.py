"""Step time of a GPT training step with each plasticity rule vs without (one run, ratios).

A step is what the trainer does: forward + backward (+ EWC penalty), grad clipping,
``engine.after_backward()``, AdamW step, ``engine.after_step(reward)``, zero_grad.
Every configuration uses the same model size and batch; a reward is given every step
(the worst case for reward-modulated rules). Configurations are measured round-robin
(``--rounds`` rounds of ``--steps`` steps each) so that machine noise hits all of them
alike; the table reports the median time per step and the ratio to the plain step.

    python benchmarks/plasticity_overhead.py --write-docs
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroplastic.config import ModelConfig  # noqa: E402
from neuroplastic.models import build_model  # noqa: E402
from neuroplastic.plasticity import PlasticityEngine  # noqa: E402
from neuroplastic.plasticity.registry import build_rule  # noqa: E402

MATRICES = ["*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight"]

CONFIGS: dict[str, list[dict]] = {
    "plain": [],
    "traces": [{"type": "traces", "params": MATRICES}],
    "traces+low-rank": [{"type": "traces", "params": MATRICES, "low_rank": True, "rank": 4}],
    "eligibility": [{"type": "eligibility", "params": MATRICES}],
    "ewc": [{"type": "ewc", "params": "*.weight"}],
    "hebbian": [{"type": "hebbian", "params": "*.mlp.c_fc"}],
    "adaptive_lr": [{"type": "adaptive_lr"}],
    "homeostasis": [{"type": "homeostasis", "params": MATRICES}],
    "consolidation": [{"type": "consolidation", "params": MATRICES}],
}


def make(rules: list[dict], args, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_flat(vocab_size=args.vocab, block_size=args.block, n_layer=args.layers,
                      n_head=args.heads, n_embd=args.dim)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    engine = PlasticityEngine(model, [build_rule(r) for r in rules], optimizer=opt) if rules else None
    x = torch.randint(0, args.vocab, (args.batch, args.block))
    y = torch.randint(0, args.vocab, (args.batch, args.block))
    if engine is not None:
        for r in engine.rules:
            if hasattr(r, "consolidate"):  # EWC: a penalty to pay for every step
                r.consolidate([(x, y)], lambda m, b: m(b[0], b[1])[1])
    return model, opt, engine, x, y


def step(model, opt, engine, x, y, i):
    _, loss = model(x, y)
    if engine is not None:
        pen = engine.penalty()
        if pen is not None:
            loss = loss + pen
        for r in engine.rules:
            if hasattr(r, "observe"):
                r.observe(float(loss.detach()))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if engine is not None:
        engine.after_backward()
    opt.step()
    if engine is not None:
        engine.after_step(reward=0.5 + 0.1 * ((i % 7) - 3))
    opt.zero_grad(set_to_none=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=258)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)

    names = [c for c in args.configs.split(",") if c]
    setups = {n: make(CONFIGS[n], args) for n in names}
    nparams = sum(p.numel() for p in setups[names[0]][0].parameters())
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        for i in range(args.warmup):
            step(*setups[n], i)
    from tqdm.auto import tqdm

    for _ in tqdm(range(args.rounds), desc="rounds"):
        for n in names:
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(*setups[n], i)
            times[n].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["plain"]) if "plain" in times else None
    lines = [
        "| configuration | ms / step (median) | ratio to plain |",
        "|---|---|---|",
    ]
    for n in names:
        med = statistics.median(times[n])
        ratio = f"{med / base:.3f}x" if base else "-"
        lines.append(f"| {n} | {med * 1e3:.1f} | {ratio} |")
    table = "\n".join(lines)
    cmd = "python benchmarks/plasticity_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"GPT {args.layers}L/{args.dim}d/{args.heads}H, {nparams / 1e6:.1f}M parameters, batch "
        f"{args.batch} x {args.block} tokens, reward every step; {args.rounds} rounds x "
        f"{args.steps} steps, round-robin. Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {_dt.date.today()}."
    )
    print(header)
    print(table)
    if args.write_docs:
        from _docs import write_section

        write_section(
            ROOT / "docs" / "BENCHMARKS.md",
            "plasticity-overhead",
            "## Plasticity rule overhead (benchmarks/plasticity_overhead.py)\n\n"
            f"Command: `{cmd.strip()}`\n\n{header}\n\n{table}\n\n"
            "Target (issue 4): Traces + momentum + low-rank at most 1.10x the plain step: "
            + _verdict(times) + "\n",
        )
    return 0


def _verdict(times: dict[str, list[float]]) -> str:
    if "plain" not in times or "traces+low-rank" not in times:
        return "not measured in this run."
    r = statistics.median(times["traces+low-rank"]) / statistics.median(times["plain"])
    return f"{'met' if r <= 1.10 else 'NOT met'} ({r:.3f}x)."


if __name__ == "__main__":
    raise SystemExit(main())
