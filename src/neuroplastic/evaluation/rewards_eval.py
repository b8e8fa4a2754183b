"""Reward components of a model's generations on prompts, for before/after comparisons.

``neuroplastic evaluate RUN --task rewards [--compare OTHER_RUN ...]`` generates a
continuation for each of ``limit`` held-out (prompt, reference) pairs -- on the synthetic
curriculum, pairs of the concepts that reward training never sees
(``SyntheticCurriculum.pairs(stage, split="heldout")``) -- with every model (greedy or
seeded sampling, the same prompts for all) and reports the mean of each reward term and
of the weighted total: "before" is the untrained model of the run's config (for a
Hugging Face model: the pretrained base without our fine-tuning), "after" the checkpoint,
and each ``--compare`` run (e.g. a CE-only fine-tune of the same budget) a column of its
own. Table + grouped bar chart (PNG).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


@torch.no_grad()
def reward_components(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    reward_fn: Any,
    *,
    max_new_tokens: int = 30,
    temperature: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Mean reward terms and total of ``model``'s continuations of ``pairs``' prompts."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    block = model.context_length
    preds, refs, n_new = [], [], []
    for prompt, ref in tqdm(pairs, desc="generating", unit="prompt", leave=False,
                            disable=len(pairs) < 8):
        ids = tokenizer.encode(prompt)[-max(1, block - max_new_tokens) :] or [tokenizer.eos_id]
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens,
                             temperature=temperature, eos_id=tokenizer.eos_id, generator=gen)
        row = [t for t in out[0, len(ids) :].tolist() if t != tokenizer.eos_id]
        preds.append(tokenizer.decode(row))
        refs.append(ref)
        n_new.append(len(row))
    model.train(was_training)
    result = reward_fn(preds, refs)
    return {"total": float(result.total), "terms": {k: float(v) for k, v in result.terms.items()},
            "new_tokens": float(np.mean(n_new)) if n_new else 0.0,  # mean generated length
            "samples": list(zip([p for p, _ in pairs], preds))[:5]}


def plot_components(columns: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(columns.values()))["terms"]) + ["total"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.8), dpi=110)
    width = 0.8 / max(len(columns), 1)
    x = np.arange(len(names))
    for i, (label, res) in enumerate(columns.items()):
        vals = [res["terms"].get(n, math.nan) for n in names[:-1]] + [res["total"]]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=label)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("mean over prompts")
    ax.set_title(title or "reward components")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def reward_pairs(cfg, tok, directory: Path, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, reference) pairs drawn with ``seed`` that the run never trained on:
    held-out synthetic concepts, else slices of the validation split."""
    if cfg.data.source == "synthetic" or cfg.curriculum.stages:
        from neuroplastic.data.synthetic import STAGES, SyntheticCurriculum

        cur = SyntheticCurriculum(seed=cfg.data.synthetic_seed)
        stages = [s for s in (cfg.curriculum.stages or cfg.data.stages or STAGES) if s in STAGES]
        # concepts held out of every reward computed during training
        pairs = [p for s in (stages or STAGES) for p in cur.pairs(s, split="heldout")]
    else:
        from neuroplastic.data.pipeline import prepare_data

        text = tok.decode(prepare_data(cfg.data, tokenizer_dir=directory / "tokenizer").val_tokens[:200_000].tolist())
        pairs = [(text[i : i + 64], text[i + 64 : i + 264]) for i in range(0, max(len(text) - 264, 1), 997)]
    idx = np.random.default_rng(seed).permutation(len(pairs))[:n]
    return [pairs[int(i)] for i in idx]
