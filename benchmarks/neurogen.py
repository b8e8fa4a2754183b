"""NeuroGen benchmarks: training speed of the full 79,872-neuron brain, learning vs a GRU and
a small transformer at equal wall-clock time on tinyshakespeare, and an ablation of the
brain's mechanisms.

* throughput: ``NeuroGenModel.train_step`` tokens/s of the full brain (scale 1: 2,048 +
  16,384 + 32,768 + 8,192 + 4,096 + 16,384 neurons), for a byte vocabulary with a 128- and a
  512-dimensional readout and for the seed's API defaults (vocab 50,257, embedding 512);
  warmup excluded, median of the timed steps, plus the cycle alone (no learning);
* learning: the full brain, a 1-layer GRU and a 2-layer GPT train on random windows of
  tinyshakespeare (bytes, 90/10 split) for the same number of seconds each, interleaved in
  slices so that machine noise hits all alike; held-out loss (nats/token) on the first
  64 x 128 held-out tokens over time, beside the unigram entropy and a count bigram;
* ablation: ``neuroplastic neurogen ablate --mechanism all`` at scale 1/8 (paired seeds,
  95% CIs, verdicts).

    python benchmarks/neurogen.py --write-docs
    python benchmarks/neurogen.py --sections throughput --threads 2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from neuroplastic.neurogen import NeuroGenModel  # noqa: E402
from neuroplastic.neurogen.experiment import (  # noqa: E402
    heldout_blocks,
    heldout_loss,
    load_corpus,
    unigram_entropy,
    windows,
)

SEED_TOKENS_PER_S = 196  # the seed's README: GTX 1650, 39,424 neurons, loss 1.0 / accuracy 0%


def machine() -> str:
    import numba

    load = os.getloadavg()
    return (f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores; torch threads "
            f"{torch.get_num_threads()}, numba threads {numba.get_num_threads()}); torch {torch.__version__}, "
            f"numba {numba.__version__}; load avg {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")


# ------------------------------------------------------------------ throughput


def throughput(configs, steps: int, echo=print, text_ids: np.ndarray | None = None) -> list[dict]:
    """``configs``: (name, vocab, dim, B, T[, brain kwargs[, "text"]]); "text" rows train on
    windows of ``text_ids`` (real token frequencies) instead of uniformly random tokens."""
    rows = []
    for cfg in configs:
        name, vocab, dim, B, T = cfg[:5]
        kw = cfg[5] if len(cfg) > 5 else {}
        text = len(cfg) > 6 and cfg[6] == "text"
        model = NeuroGenModel(vocab, dim, -1, **kw)
        rng = np.random.default_rng(0)
        if text and kw.get("softmax") == "adaptive":
            model.set_token_frequencies(np.bincount(text_ids, minlength=vocab))

        def draw(rng=rng, B=B, T=T, vocab=vocab, text=text):
            if text:
                s = rng.integers(0, len(text_ids) - T - 1, B)
                return np.stack([text_ids[i : i + T + 1] for i in s])
            return rng.integers(0, vocab, (B, T + 1))
        x = draw()
        model.train_step(x[:, :-1], x[:, 1:])  # warmup (and compilation)
        times, cpu = [], []
        for _ in range(steps):
            x = draw()
            t, c = time.perf_counter(), time.process_time()
            model.train_step(x[:, :-1], x[:, 1:])
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        # the cycle alone (inference: no readout, no learning)
        brain = model.brain
        xc = torch.from_numpy(x[:, :-1])
        t = time.perf_counter()
        brain.run_cycle(xc, brain.fresh_state(B))
        cyc = time.perf_counter() - t
        n = B * T
        tps = [n / s for s in times]
        row = {
            "config": name, "vocab": vocab, "dim": dim, "batch": B, "seq": T, "neurons": brain.n_neurons,
            "synapses": brain.n_synapses, "params": sum(p.numel() for p in brain.readout_parameters()),
            "tokens_per_s": statistics.median(tps), "min": min(tps), "max": max(tps),
            "cpu_us_per_token": statistics.median(cpu) / n * 1e6, "cycle_tokens_per_s": n / cyc,
        }
        echo(f"{name}: {row['tokens_per_s']:,.0f} tokens/s (cycle alone {row['cycle_tokens_per_s']:,.0f}), "
             f"{row['cpu_us_per_token']:.0f} CPU-us/token")
        rows.append(row)
        del model, brain
    return rows


# ------------------------------------------------------------------ baselines


class GRULM(nn.Module):
    def __init__(self, vocab: int, emb: int = 128, hidden: int = 256):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = nn.GRU(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.head(h)


def gpt_lm(vocab: int, block: int):
    from neuroplastic.config import ModelConfig
    from neuroplastic.models.transformer import GPT

    return GPT(ModelConfig.from_flat(vocab_size=vocab, block_size=block, n_layer=2, n_head=4, n_embd=128))


class TorchRunner:
    """A baseline LM behind the two calls the comparison needs (train_step, evaluate)."""

    def __init__(self, model: nn.Module, lr: float, gpt: bool = False):
        self.model, self.gpt = model, gpt
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))

    def _logits(self, x):
        out = self.model(x)
        return out[0] if isinstance(out, tuple) else out

    def train_step(self, x, y) -> float:
        self.model.train()
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        loss = F.cross_entropy(self._logits(x).flatten(0, 1), y.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, x, y) -> float:
        self.model.eval()
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        return float(F.cross_entropy(self._logits(x).flatten(0, 1), y.flatten()))


def bigram_loss(train: np.ndarray, val: tuple[np.ndarray, np.ndarray], vocab: int) -> float:
    """Held-out loss of a count bigram (interpolated with the unigram, weight tuned on nothing: 0.9)."""
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (train[:-1], train[1:]), 1.0)
    uni = np.bincount(train, minlength=vocab) + 1.0
    uni /= uni.sum()
    row = counts.sum(1, keepdims=True)
    p = 0.9 * np.divide(counts, row, out=np.zeros_like(counts), where=row > 0) + 0.1 * uni[None, :]
    x, y = val
    return float(-np.log(p[x.reshape(-1), y.reshape(-1)]).mean())


def interleaved(runners: dict, train: np.ndarray, val, seconds: float, slice_steps: int, batch: int, seq: int,
                eval_every: float, desc: str, echo=print) -> tuple[dict, dict]:
    """Train every runner for ``seconds`` of its own step time, in interleaved slices of
    ``slice_steps`` steps on the same random windows (so machine noise hits all alike);
    held-out loss every ``eval_every`` training seconds and at the end."""
    from tqdm.auto import tqdm

    rngs = {n: np.random.default_rng(1) for n in runners}  # the same windows for every model
    spent = dict.fromkeys(runners, 0.0)
    tokens = dict.fromkeys(runners, 0)
    next_eval = dict.fromkeys(runners, 0.0)
    curves: dict[str, list[tuple[float, int, float]]] = {n: [] for n in runners}
    bar = tqdm(total=len(runners) * seconds, unit="s", desc=desc)
    while min(spent.values()) < seconds:
        for name, r in runners.items():
            if spent[name] >= seconds:
                continue
            if spent[name] >= next_eval[name]:
                curves[name].append((spent[name], tokens[name], heldout_loss(r, val)))
                next_eval[name] += eval_every
            for _ in range(slice_steps):
                x, y = windows(train, batch, seq, rngs[name])
                t = time.perf_counter()
                r.train_step(x, y)
                dt = time.perf_counter() - t
                spent[name] += dt
                tokens[name] += x.size
                bar.update(dt)
                if spent[name] >= seconds:
                    break
    bar.close()
    for name, r in runners.items():
        curves[name].append((spent[name], tokens[name], heldout_loss(r, val)))
        echo(f"{name}: held-out loss {curves[name][-1][2]:.4f} after {tokens[name]:,} tokens in {spent[name]:.0f} s")
    return curves, tokens


def learning(seconds: float, slice_steps: int, batch: int, seq: int, eval_every: float, scale: float,
             dim: int, echo=print) -> dict:
    corpus = load_corpus("tinyshakespeare")
    val = heldout_blocks(corpus.val, 128, 64)
    V = corpus.vocab_size
    torch.manual_seed(0)
    runners = {
        f"NeuroGen brain (scale {scale:g}, d {dim})": NeuroGenModel(V, dim, -1, scale=scale),
        "GRU (1 x 256)": TorchRunner(GRULM(V), 3e-3),
        "GPT (2 x 128)": TorchRunner(gpt_lm(V, max(seq, 128)), 3e-3, gpt=True),
    }
    params = {
        n: sum(p.numel() for p in (r.brain.readout_parameters() if isinstance(r, NeuroGenModel) else r.model.parameters()))
        for n, r in runners.items()
    }
    curves, tokens = interleaved(runners, corpus.train, val, seconds, slice_steps, batch, seq, eval_every,
                                 "learning (all models)", echo)
    return {
        "curves": curves, "params": params, "tokens": tokens, "seconds": seconds,
        "unigram": unigram_entropy(corpus.train, V), "bigram": bigram_loss(corpus.train, val, V),
        "batch": batch, "seq": seq,
    }


def bpe_corpus(tokenizer: str):
    """tinyshakespeare under a local BPE tokenizer (a directory or a registry model name), 90/10."""
    path = Path(tokenizer)
    if not path.exists():
        # a registry name, e.g. smollm2-135m-instruct
        from neuroplastic.models.registry import resolve_model

        path = Path(resolve_model(tokenizer))
    return load_corpus("tinyshakespeare", tokenizer=str(path))


def vocab_learning(seconds: float, slice_steps: int, batch: int, seq: int, eval_every: float, dim: int,
                   tokenizer: str, vocab: int, echo=print) -> dict:
    """Full vs adaptive softmax at a real vocabulary, equal wall-clock, exact held-out loss."""
    corpus = bpe_corpus(tokenizer)
    train_ids, val_ids, tok_vocab = corpus.train, corpus.val, corpus.vocab_size
    vocab = max(vocab, tok_vocab)
    val = heldout_blocks(val_ids, 64, 64)
    counts = np.bincount(train_ids, minlength=vocab)
    runners = {"full softmax": NeuroGenModel(vocab, dim, -1),
               "adaptive softmax": NeuroGenModel(vocab, dim, -1, softmax="adaptive")}
    runners["adaptive softmax"].set_token_frequencies(counts)
    curves, tokens = interleaved(runners, train_ids, val, seconds, slice_steps, batch, seq, eval_every,
                                 "full vs adaptive softmax", echo)
    return {"curves": curves, "tokens": tokens, "seconds": seconds, "vocab": vocab, "tokenizer_vocab": tok_vocab,
            "unigram": unigram_entropy(train_ids, vocab), "batch": batch, "seq": seq, "dim": dim,
            "train_tokens": int(len(train_ids)), "val_tokens": int(val[0].size)}


def plot_vocab(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for name, pts in res["curves"].items():
        ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=name)
    ax.axhline(res["unigram"], color="0.5", ls=":", lw=1, label="unigram entropy")
    ax.set_xlabel("training seconds (2 CPU cores)")
    ax.set_ylabel("held-out loss (nats/token, exact)")
    ax.set_title(f"NeuroGen readout at vocabulary {res['vocab']:,}: full vs adaptive softmax", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_learning(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for i, (name, pts) in enumerate(res["curves"].items()):
        s, tok, loss = zip(*pts)
        axes[0].plot(s, loss, "-o", ms=3, label=name, color=f"C{i}")
        axes[1].plot(np.array(tok) / 1e6, loss, "-o", ms=3, label=name, color=f"C{i}")
    for ax in axes:
        ax.axhline(res["unigram"], color="0.5", ls="--", lw=1, label="unigram entropy")
        ax.axhline(res["bigram"], color="0.3", ls=":", lw=1, label="count bigram")
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("training seconds (same budget for all)")
    axes[1].set_xlabel("training tokens (millions)")
    axes[0].legend(fontsize=8)
    fig.suptitle("tinyshakespeare (bytes): NeuroGen brain vs GRU vs GPT at equal wall-clock", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_throughput(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8), dpi=110)
    names = [textwrap.fill(r["config"], 30) for r in rows] + ["seed (GTX 1650, 39,424 neurons)"]
    vals = [r["tokens_per_s"] for r in rows] + [SEED_TOKENS_PER_S]
    ax.barh(names, vals, color=["C0"] * len(rows) + ["0.6"])
    ax.axvline(10_000, color="C3", ls="--", lw=1, label="target 10,000 tokens/s")
    ax.set_xscale("log")
    ax.set_xlim(right=max(vals) * 4)
    ax.set_xlabel("training tokens/s (log scale)")
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("NeuroGen training throughput: full 79,872-neuron brain, 2 CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="throughput,learning,vocab,ablation")
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct",
                    help="real-vocabulary rows: a local BPE tokenizer (directory or registry model name)")
    ap.add_argument("--vocab-seconds", type=float, default=240.0, help="vocab: training seconds per readout")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per throughput config")
    ap.add_argument("--seconds", type=float, default=300.0, help="learning: training seconds per model")
    ap.add_argument("--slice", type=int, default=5, help="learning: steps per interleaved slice")
    ap.add_argument("--eval-every", type=float, default=30.0, help="learning: seconds between held-out evals")
    ap.add_argument("--scale", type=float, default=1.0, help="learning: brain scale")
    ap.add_argument("--dim", type=int, default=128, help="learning: brain embedding_dim")
    ap.add_argument("--ablation-steps", type=int, default=60)
    ap.add_argument("--ablation-seeds", type=int, default=3)
    ap.add_argument("--ablation-scale", type=float, default=1.0)
    ap.add_argument("--out", default="runs/bench-neurogen")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    sections = [s for s in args.sections.split(",") if s]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/neurogen.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [f"Command: `{cmd.strip()}`  ", f"Machine at start: {machine()}  ",
            f"Date: {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC", ""]
    results: dict = {}
    parts: dict[str, list[str]] = {}
    if "throughput" in sections:
        configs = [
            ("bytes, d 128, 256 x 64", 258, 128, 256, 64),
            ("bytes, d 512, 256 x 64", 258, 512, 256, 64),
            ("GPT-2 vocab 50,257, d 512 (seed's API defaults), 32 x 64", 50257, 512, 32, 64),
            ("vocab 50,257, d 512, full softmax, BPE text, 32 x 64", 50257, 512, 32, 64, {}, "text"),
            ("vocab 50,257, d 512, adaptive softmax, BPE text, 256 x 64", 50257, 512, 256, 64,
             {"softmax": "adaptive"}, "text"),
        ]
        text_ids = bpe_corpus(args.tokenizer).train
        rows = throughput(configs, args.steps, text_ids=text_ids)
        results["throughput"] = rows
        plot_throughput(rows, ROOT / "docs" / "neurogen_throughput.png")
        p = parts["throughput"] = [
            "### Training throughput of the full brain",
            "",
            *head,
            "`NeuroGenModel.train_step` (cycle + readout gradient + AdamW + three-factor, tagging, "
            "homeostasis, replay), the full 79,872-neuron brain, median of the timed steps after a warmup step; "
            "'cycle alone' is the five-phase cycle without learning. Rows marked 'BPE text' train on windows of "
            f"tinyshakespeare tokenized with `{args.tokenizer}`'s BPE tokenizer (49,152 ids, real token "
            "frequencies; the adaptive softmax's clusters ordered by them); the others on uniformly random "
            "tokens. The seed reports 196 tokens/s on a GTX 1650 (39,424 neurons, no learning: loss 1.0, accuracy 0%).",
            "",
            "| configuration | neurons | synapses | readout params | tokens/s (min-max) | CPU µs/token | cycle alone tokens/s | vs seed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            p.append(
                f"| {r['config']} | {r['neurons']:,} | {r['synapses']:,} | {r['params'] / 1e6:.1f}M | "
                f"{r['tokens_per_s']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f}) | {r['cpu_us_per_token']:.0f} | "
                f"{r['cycle_tokens_per_s']:,.0f} | {r['tokens_per_s'] / SEED_TOKENS_PER_S:.0f}x |")
        p += ["", f"Machine after: {machine()}", "", "![throughput](neurogen_throughput.png)", ""]
    if "learning" in sections:
        res = learning(args.seconds, args.slice, 32, 64, args.eval_every, args.scale, args.dim)
        results["learning"] = res
        plot_learning(res, ROOT / "docs" / "neurogen_learning.png")
        p = parts["learning"] = [
            f"### Learning at equal wall-clock: {args.seconds:.0f} s each on tinyshakespeare (bytes)",
            "",
            *head,
            f"Random windows of 32 x 64 tokens (the same windows for every model), interleaved {args.slice}-step "
            "slices; held-out loss on the first 64 x 128 bytes of the last 10% of the text. "
            f"Unigram entropy {res['unigram']:.3f}, count bigram {res['bigram']:.3f} nats/byte.",
            "",
            "| model | trained params | tokens seen | tokens/s | held-out loss at the end | best held-out loss |",
            "|---|---|---|---|---|---|",
        ]
        for name, pts in res["curves"].items():
            tok = res["tokens"][name]
            p.append(f"| {name} | {res['params'][name] / 1e6:.2f}M | {tok:,} | {tok / args.seconds:,.0f} | "
                     f"{pts[-1][2]:.4f} | {min(q[2] for q in pts):.4f} |")
        p += ["", f"Machine after: {machine()}", "", "![learning](neurogen_learning.png)", ""]
    if "vocab" in sections:
        res = vocab_learning(args.vocab_seconds, 2, 64, 64, args.eval_every, 512, args.tokenizer, 50257)
        results["vocab"] = res
        plot_vocab(res, ROOT / "docs" / "neurogen_vocab.png")
        p = parts["vocab"] = [
            f"### Full vs adaptive softmax at vocabulary {res['vocab']:,}: {args.vocab_seconds:.0f} s each",
            "",
            *head,
            f"The full brain (d {res['dim']}) on tinyshakespeare tokenized with `{args.tokenizer}`'s BPE tokenizer "
            f"({res['tokenizer_vocab']:,} ids; {res['train_tokens']:,} training tokens, 90/10 split), random windows "
            f"of {res['batch']} x {res['seq']} tokens (the same windows for both), interleaved 2-step slices. "
            "The adaptive softmax (head: the 512 most frequent tokens + 3 clusters; tails 512-4,000 at d/4, "
            "4,000-16,000 at d/16, the rest at d/64) is ordered by the training split's token counts. "
            f"Held-out loss is exact (each readout's normalised distribution) on {res['val_tokens']:,} held-out "
            f"tokens; unigram entropy {res['unigram']:.3f} nats/token.",
            "",
            "| readout | tokens seen | tokens/s | held-out loss at the end | best held-out loss |",
            "|---|---|---|---|---|",
        ]
        for name, pts in res["curves"].items():
            tok = res["tokens"][name]
            p.append(f"| {name} | {tok:,} | {tok / args.vocab_seconds:,.0f} | {pts[-1][2]:.4f} | "
                     f"{min(q[2] for q in pts):.4f} |")
        p += ["", f"Machine after: {machine()}", "", "![vocab](neurogen_vocab.png)", ""]
    if "ablation" in sections:
        import shutil

        from neuroplastic.neurogen.ablate import run_neurogen_ablation
        from neuroplastic.neurogen.cli import MECHANISM_NAMES

        res = run_neurogen_ablation(list(MECHANISM_NAMES), seeds=args.ablation_seeds, steps=args.ablation_steps,
                                    batch=32, seq_len=64, embedding_dim=128,
                                    overrides={"scale": args.ablation_scale}, out_dir=out / "ablation")
        results["ablation"] = {"markdown": res["markdown"], "losses": res["losses"]}
        shutil.copy(res["png"], ROOT / "docs" / "neurogen_ablation.png")
        md = res["markdown"].replace("### ", f"### Ablation (brain scale {args.ablation_scale:g}): ", 1).split("\n", 2)
        parts["ablation"] = [md[0], "", *head, md[2], f"Machine after: {machine()}", "",
                             "![ablation](neurogen_ablation.png)", ""]
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    for key in parts:
        print("\n".join(parts[key]))
    if args.write_docs:
        write_parts({k: "\n".join(v) + "\n" for k, v in parts.items()})
    return 0


PART_ORDER = ("throughput", "learning", "vocab", "ablation")


def write_parts(new: dict[str, str]) -> None:
    """Update the parts that ran inside the ``neurogen`` section, keep the others."""
    import re

    from _docs import read_section, write_section

    doc = ROOT / "docs" / "BENCHMARKS.md"
    current = read_section(doc, "neurogen")
    old = {}
    if current is not None:
        old = dict(re.findall(r"<!-- part:(\w+) -->\n(.*?)<!-- /part:\1 -->\n", current, re.S))
    old.update(new)
    body = "## NeuroGen brain (benchmarks/neurogen.py)\n\n" + (
        "Each part below was measured with the command it shows, on this 2-core CPU shared with other "
        "engineers' jobs (load averages at start and end are given).\n\n"
    ) + "".join(f"<!-- part:{k} -->\n{old[k]}<!-- /part:{k} -->\n" for k in PART_ORDER if k in old)
    write_section(doc, "neurogen", body)


if __name__ == "__main__":
    raise SystemExit(main())
