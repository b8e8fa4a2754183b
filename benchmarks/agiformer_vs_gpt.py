"""agiformer (Hebbian fast-weight LM) vs the same-size GPT at equal wall-clock time.

Both models train on the `agiformer` recipe's data (its 3-stage curriculum; on a machine
without WordNet/TinyStories/WikiText the embedded synthetic stages) for the same number
of seconds, interleaved in slices so that machine noise hits both alike. Reported: tokens
per second, steps done, and validation loss / bits per byte (BPC for these byte models)
on every stage at the end. The GPT baseline is `model.arch=gpt` with the same
n_layer / n_head / n_embd (the agiformer's memory adds <1% parameters).

    python benchmarks/agiformer_vs_gpt.py --seconds 120 --write-docs
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from neuroplastic.config import load_config  # noqa: E402
from neuroplastic.training.trainer import Trainer  # noqa: E402


def make(arch: str, out: Path, args) -> Trainer:
    over = [
        f"model.arch={arch}", f"train.out_dir={out}", "train.progress=false",
        "train.tensorboard=false", "train.max_steps=100000", "train.eval_interval=0",
        "train.ckpt_interval=0", "train.keep_best=false", f"train.batch_size={args.batch}",
        f"model.block_size={args.block}",
    ]
    if arch == "gpt":
        over.append("curriculum.alphas=[]")
    return Trainer(load_config("agiformer", over)).setup()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0, help="training time per model")
    ap.add_argument("--slice", type=int, default=10, help="steps per interleaved slice")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="agi-vs-gpt-"))
    trainers = {arch: make(arch, tmp / arch, args) for arch in ("hebbian", "gpt")}
    spent = {a: 0.0 for a in trainers}
    # probe: one slice each, then size each run (schedule and curriculum boundaries) to the
    # number of steps it can do in the budget
    for arch, t in trainers.items():
        t0 = time.perf_counter()
        t.train(stop_at=t.step + args.slice)
        spent[arch] += time.perf_counter() - t0
        steps = max(args.slice + 1, int(args.seconds * t.step / spent[arch]))
        t.cfg.train.max_steps = steps
        t.curriculum.max_steps = steps
    from tqdm.auto import tqdm

    bar = tqdm(total=2 * args.seconds, unit="s", desc="training both")
    while min(spent.values()) < args.seconds:
        for arch, t in trainers.items():
            if spent[arch] >= args.seconds:
                continue
            t0 = time.perf_counter()
            if t.step >= t.cfg.train.max_steps:
                spent[arch] = max(spent[arch], args.seconds)
                continue
            t.train(stop_at=t.step + args.slice)
            dt = time.perf_counter() - t0
            spent[arch] += dt
            bar.update(dt)
    bar.close()
    rows = []
    for arch, t in trainers.items():
        ev = t.evaluate()
        tok_s = t.tokens_seen / spent[arch]
        n = sum(p.numel() for p in t.model.parameters())
        stages = " / ".join(f"{ev[k]:.3f}" for k in ev if k.endswith("/loss"))
        rows.append(f"| {'agiformer (hebbian)' if arch == 'hebbian' else 'GPT'} | {n / 1e6:.2f}M | "
                    f"{t.step} | {tok_s:,.0f} | {ev['loss']:.4f} | {ev['bpb']:.4f} | {stages} |")
    table = "\n".join([
        "| model | params | steps | tokens/s | val loss (nats/byte, mean of stages) | val BPC | per-stage loss |",
        "|---|---|---|---|---|---|---|", *rows])
    cmd = "python benchmarks/agiformer_vs_gpt.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"{args.seconds:.0f} s of training each, interleaved in {args.slice}-step slices, batch "
              f"{args.batch} x {args.block} bytes, 1 x {platform.machine()} CPU machine with "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, {_dt.date.today()}.")
    print(header)
    print(table)
    if args.write_docs:
        from _docs import write_section

        write_section(ROOT / "docs" / "BENCHMARKS.md", "agiformer-vs-gpt",
                       "## agiformer vs same-size GPT at equal wall-clock (benchmarks/agiformer_vs_gpt.py)\n\n"
                       f"Command: `{cmd.strip()}`\n\n{header}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
