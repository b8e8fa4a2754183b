"""Reward on sampled generations, every ``reward.interval`` steps (neuroplastic-llm).

At a reward step the callback draws ``num_prompts`` (prompt, reference) pairs of the
current curriculum stage, samples a continuation of each prompt from the model,
measures the perplexity of the reference under the model (teacher forcing), and
scores the generations with :class:`~neuroplastic.rewards.MultiObjectiveReward`
(ROUGE-L, unique-word ratio, diversity, perplexity by default). The mean total becomes
the step's ``ctx.reward`` (:class:`~neuroplastic.training.callbacks.StepContext`); the
plasticity engine turns it into an advantage against its running baseline and modulates
the plastic update with it. Each term is logged.

Prompts and sampling use generators seeded by ``(train.seed, step)``, never the
global RNG, so a resumed run draws the same prompts and samples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from neuroplastic.config import RewardConfig
from neuroplastic.training.callbacks import Callback, StepContext


def pairs_for(ctx: StepContext, stage: str | None) -> list[tuple[str, str]]:
    """(prompt, reference) pairs for a stage: synthetic pairs, or windows of validation text.

    Synthetic pairs come from the ``train`` split: the concepts held out for
    ``neuroplastic evaluate --task rewards`` never reach a reward computed here. Of
    ``ctx`` only ``cfg`` (and, for other corpora, ``data`` and ``tokenizer``) is read.
    """
    cfg = ctx.cfg
    if cfg.data.source == "synthetic":
        from neuroplastic.data.synthetic import STAGES, SyntheticCurriculum

        cur = SyntheticCurriculum(seed=cfg.data.synthetic_seed)
        stages = [stage] if stage in STAGES else list(cfg.data.stages or STAGES)
        return [p for s in stages for p in cur.pairs(s, split="train")]
    # any other corpus: a prompt of 64 characters of held-out text, the next 200 as reference
    tokens = ctx.data.val[stage] if stage is not None else ctx.data.val_tokens
    text = ctx.tokenizer.decode(np.asarray(tokens[:200_000]).tolist())
    out = []
    for start in range(0, max(len(text) - 264, 1), 997):
        prompt, ref = text[start : start + 64], text[start + 64 : start + 264]
        if prompt.strip() and ref.strip():
            out.append((prompt, ref))
    return out or [(text[:32], text[32:232])]


class RewardCallback(Callback):
    name = "reward"

    def __init__(self, cfg: RewardConfig):
        from neuroplastic.rewards import MultiObjectiveReward

        self.cfg = cfg
        self.reward_fn = MultiObjectiveReward(
            dict(cfg.weights), perplexity_form=cfg.perplexity_form, tau=cfg.perplexity_tau
        )
        self._pairs: dict[Any, list[tuple[str, str]]] = {}

    def _current_pairs(self, ctx: StepContext) -> list[tuple[str, str]]:
        stage = ctx.curriculum.stage if ctx.curriculum is not None else None
        if stage not in self._pairs:
            self._pairs[stage] = pairs_for(ctx, stage)
        return self._pairs[stage]

    @torch.no_grad()
    def _reference_ppl(self, ctx: StepContext, prompt_ids: list[int], ref_ids: list[int]) -> float:
        block = ctx.cfg.model.block_size
        ids = (prompt_ids + ref_ids)[-(block + 1) :]
        n_ref = min(len(ref_ids), len(ids) - 1)
        if n_ref <= 0:
            return float("inf")
        x = torch.tensor([ids[:-1]], device=ctx.device)
        y = torch.tensor([ids[1:]], device=ctx.device)
        logits, _ = ctx.model(x)
        nll = F.cross_entropy(logits[0, -n_ref:].float(), y[0, -n_ref:])
        return math.exp(min(float(nll), 50.0))

    def compute(self, ctx: StepContext, step: int) -> dict[str, Any]:
        """Sample, score and return ``{"total", "terms", "samples"}`` for ``step``."""
        cfg, tok = self.cfg, ctx.tokenizer
        pairs = self._current_pairs(ctx)
        rng = np.random.default_rng([ctx.cfg.train.seed, step, 17])
        picks = rng.choice(len(pairs), size=min(cfg.num_prompts, len(pairs)), replace=False)
        gen = torch.Generator(device=ctx.device)
        gen.manual_seed(ctx.cfg.train.seed * 1_000_003 + step)
        model = ctx.model
        was_training = model.training
        model.eval()
        preds, refs, ppls = [], [], []
        block = ctx.cfg.model.block_size
        try:
            for i in picks:
                prompt, ref = pairs[int(i)]
                p_ids = tok.encode(prompt)[-(block // 2) :] or [tok.eos_id]
                out = model.generate(
                    torch.tensor([p_ids], device=ctx.device), cfg.max_new_tokens,
                    temperature=cfg.temperature, top_k=cfg.top_k or None,
                    eos_id=tok.eos_id, generator=gen,
                )
                preds.append(tok.decode(out[0, len(p_ids) :].tolist()))
                refs.append(ref)
                ppls.append(self._reference_ppl(ctx, p_ids, tok.encode(ref)))
        finally:
            model.train(was_training)
        result = self.reward_fn(preds, refs, ppl=ppls)
        return {"total": result.total, "terms": result.terms, "samples": list(zip(refs, preds))}

    def after_step(self, ctx: StepContext, metrics: dict[str, Any]) -> None:
        step = ctx.step + 1  # the step being completed
        if step % self.cfg.interval:
            return
        r = self.compute(ctx, step)
        ctx.reward = r["total"]
        metrics["reward"] = r["total"]
        for k, v in r["terms"].items():
            metrics[f"reward/{k}"] = v
        ctx.logger.log("reward", step, total=r["total"], **{k: v for k, v in r["terms"].items()},
                           sample=r["samples"][0][1] if r["samples"] else "")
