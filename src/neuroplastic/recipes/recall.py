"""Recall training: teach a byte-level model to find a needle (``recipe_module: recall``).

``neuroplastic train needle-recall`` trains with :class:`RecallStep`, a step strategy
inside the run shell (``training/run.py``) instead of the language-model trainer's
gradient step, because recall needs two things that step does not do:

* **fresh documents every step** (:func:`~neuroplastic.data.recall_tasks.
  multi_needle_document`): each key is seen once, so nothing can be memorised and every
  correct answer is recall;
* **answer-weighted loss**: the bytes of each answer (``" 4821"``) count
  ``options.answer_weight`` times in the cross-entropy, all other bytes once. Measured
  (docs/BENCHMARKS.md, section "needle"): with weight 1 a 1 x 128 delta-rule agiformer
  is still at chance after 700 steps; with weight 10 its digit accuracy leaves chance by step 100, because
  four digits per ~300 bytes are otherwise a whisper in the language-model loss.

A length curriculum goes with them: ``options.short_fraction`` of ``train.max_steps`` on
``short_bytes`` documents packed into ``short_block``-byte rows, then the rest on
``long_bytes`` documents in ``long_block``-byte rows (the same bytes per step: the batch
shrinks). Short documents hold ~4x more needles per byte, so the binding is learnt
quickly; long ones then teach it to survive 2 KB of filler.

Every ``train.eval_interval`` steps a quick check runs: for each ``options.eval_lengths``
length, ``options.eval_examples`` fixed needle examples (5 depths) are scored by teacher
forcing: ``exact`` = all four digits right (what greedy decoding needs), ``digits`` =
per-digit accuracy (chance 0.1). The full grid with a heatmap is ``neuroplastic evaluate
RUN --task needle``. Checkpoints (``train.ckpt_interval`` and at the end) have the
shell's format, so ``evaluate``/``generate`` read them, and ``--resume`` continues a run
exactly (model, optimizer, step and the document generator's state). It uses
``train.max_steps``, ``batch_size`` (rows of ``short_block`` bytes; the long phase keeps the
bytes per step), ``lr``/``min_lr``/``warmup_steps``, the AdamW settings, ``grad_clip``,
``seed``, ``device`` and the interval keys; it runs in float32 on one process (``amp``,
``grad_accum``, ``compile`` and the plasticity/reward sections do not apply here).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neuroplastic.config import RunConfig, build_dataclass
from neuroplastic.data import recall_tasks
from neuroplastic.errors import UserError
from neuroplastic.models import checkpoint_io
from neuroplastic.recipes import Recipe

__all__ = [
    "RECIPE", "RecallBatches", "RecallOptions", "RecallStep", "quick_recall_eval", "recall_batch",
    "train_recall", "weighted_loss",
]


@dataclass
class RecallOptions:
    answer_weight: float = 10.0
    max_needles: int = 1  # needles per document, drawn from 1..max_needles
    short_bytes: list[int] = field(default_factory=lambda: [128, 512])
    long_bytes: list[int] = field(default_factory=lambda: [512, 2048])
    short_block: int = 512
    long_block: int = 2048
    short_fraction: float = 0.5
    eval_lengths: list[int] = field(default_factory=lambda: [512, 2048])
    eval_examples: int = 20

    def validate(self, cfg: RunConfig) -> RecallOptions:
        if not (isinstance(self.answer_weight, int | float) and self.answer_weight > 0):
            raise UserError(f"options.answer_weight must be positive, got {self.answer_weight!r}.")
        if not 1 <= self.max_needles <= len(recall_tasks.NEEDLE_SUBJECTS):
            raise UserError(
                f"options.max_needles must be in 1..{len(recall_tasks.NEEDLE_SUBJECTS)}, "
                f"got {self.max_needles}."
            )
        for name in ("short_bytes", "long_bytes"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 100 <= lo_hi[0] <= lo_hi[1]:
                raise UserError(
                    f"options.{name} must be [min, max] bytes with 100 <= min <= max "
                    f"(a needle and its question take ~95 bytes), got {lo_hi!r}."
                )
        for name in ("short_block", "long_block"):
            value = getattr(self, name)
            if not 1 <= value <= cfg.model.block_size:
                raise UserError(
                    f"options.{name} ({value}) must be between 1 and model.block_size "
                    f"({cfg.model.block_size})."
                )
        if not 0.0 <= self.short_fraction <= 1.0:
            raise UserError(f"options.short_fraction must be in [0, 1], got {self.short_fraction!r}.")
        if not self.eval_lengths or any(n < 100 for n in self.eval_lengths):
            raise UserError(f"options.eval_lengths must be byte lengths >= 100, got {self.eval_lengths!r}.")
        if self.eval_examples < 1:
            raise UserError(f"options.eval_examples must be >= 1, got {self.eval_examples}.")
        return self


# --------------------------------------------------------------------------- data


def recall_batch(
    rng: random.Random, rows: int, block: int, lo: int, hi: int, max_needles: int,
    answer_weight: float, eos_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, w)``, each ``(rows, block)``: fresh multi-needle documents (lengths uniform
    in ``[lo, hi]`` bytes) packed with ``eos_id`` between them; ``w`` weights the targets,
    ``answer_weight`` on answer bytes and 1 elsewhere."""
    xs, ws = [], []
    for _ in range(rows):
        toks: list[int] = []
        wts: list[float] = []
        while len(toks) < block + 1:
            n = rng.randint(lo, hi)
            k = max(1, min(rng.randint(1, max_needles), n // 128))  # leave room for filler
            doc, spans = recall_tasks.multi_needle_document(n - 1, k, rng=rng)
            raw = list(doc.encode("utf-8"))
            w = [1.0] * len(raw)
            for a, b in spans:
                w[a:b] = [answer_weight] * (b - a)
            toks += raw + [eos_id]
            wts += w + [1.0]
        xs.append(toks[: block + 1])
        ws.append(wts[: block + 1])
    t = torch.tensor(xs)
    return t[:, :-1], t[:, 1:], torch.tensor(ws)[:, 1:]


def _eval_examples(lengths: list[int], n: int) -> dict[int, list[tuple[str, str]]]:
    depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    out = {}
    for length in lengths:
        rng = random.Random(f"neuroplastic-recall-quick-eval:{length}")
        out[length] = [
            recall_tasks.needle_example(length, depths[i % len(depths)], rng=rng) for i in range(n)
        ]
    return out


@torch.no_grad()
def quick_recall_eval(model: torch.nn.Module, examples: dict[int, list[tuple[str, str]]],
                      device: torch.device) -> dict[str, float]:
    """Teacher-forced needle recall per length: ``{f"{n}/exact", f"{n}/digits"}``."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for n, items in examples.items():
        exact = digits = 0.0
        for prompt, answer in items:
            x = torch.tensor([list((prompt + answer).encode("utf-8"))], device=device)
            logits, _ = model(x[:, :-1])
            la = len(answer.encode("utf-8"))
            pred, gold = logits[0, -la:].argmax(-1), x[0, -la:]
            exact += float(torch.equal(pred, gold))
            digits += (pred[1:] == gold[1:]).float().mean().item()
        out[f"{n}/exact"] = exact / len(items)
        out[f"{n}/digits"] = digits / len(items)
    model.train(was_training)
    return out


# --------------------------------------------------------------------------- step


class RecallBatches:
    """The batch source: fresh needle documents every step, short ones for the first
    ``options.short_fraction`` of the steps, then long ones (the same bytes per step)."""

    def __init__(self, cfg: RunConfig, opts: RecallOptions, eos_id: int):
        self.opts, self.eos_id = opts, eos_id
        self.rows = cfg.train.batch_size
        self.short_steps = round(opts.short_fraction * cfg.train.max_steps)
        self.rng = random.Random(f"neuroplastic-recall-train:{cfg.train.seed}")

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(x, y, w, block)`` for optimizer step ``step``."""
        o = self.opts
        if step < self.short_steps:
            block, (lo, hi), rows = o.short_block, o.short_bytes, self.rows
        else:
            block, (lo, hi) = o.long_block, o.long_bytes
            rows = max(1, self.rows * o.short_block // block)
        x, y, w = recall_batch(self.rng, rows, block, lo, hi, o.max_needles, o.answer_weight,
                               self.eos_id)
        return x, y, w, block

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


def weighted_loss(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with target ``i`` counted ``w[i]`` times (a weighted mean)."""
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                          reduction="none")
    return (nll * w.reshape(-1)).sum() / w.sum()


class RecallStep:
    """The recall recipe's step strategy inside the run shell (:class:`~neuroplastic.
    training.run.Run`): a :class:`RecallBatches` batch, :func:`weighted_loss`, one AdamW
    step; the quick recall check every ``train.eval_interval`` steps."""

    def __init__(self, cfg: RunConfig, *, echo=None, progress: bool | None = None):
        from neuroplastic.training.run import Run

        self.opts = build_dataclass(RecallOptions, dict(cfg.options), "options").validate(cfg)
        if cfg.data.tokenizer != "byte":
            raise UserError(
                f"The recall recipe trains on bytes (the answer weights are byte offsets); set "
                f"data.tokenizer=byte instead of {cfg.data.tokenizer!r}."
            )
        if cfg.model.arch == "hf":
            raise UserError("The recall recipe trains models from scratch; model.arch=hf is not supported.")
        self.cfg = cfg
        self.echo = echo or (lambda s: None)
        self.progress = progress
        self.run = Run(cfg, self.echo)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.last_eval: dict[str, float] = {}
        self.resumed_from: Path | None = None
        self._setup_done = False

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def progress_desc(self) -> str:
        return f"recall {self.cfg.name}"

    def close(self) -> None:
        self.run.close()

    def setup(self) -> RecallStep:
        if not self._setup_done:
            self.run.setup(self._setup)
            self._setup_done = True
        return self

    def _setup(self) -> None:
        from neuroplastic.data.tokenizers import build_tokenizer
        from neuroplastic.models import build_model
        from neuroplastic.runtime import resolve_device, set_rng_state
        from neuroplastic.training.optim import build_optimizer

        cfg, tc = self.cfg, self.cfg.train
        resume_path, loaded = self.run.resume()
        self.device = resolve_device(tc.device, option="train.device")
        self.tokenizer = build_tokenizer("byte", lambda: iter(()), 0)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = self.tokenizer.vocab_size
        torch.manual_seed(tc.seed)
        self.model = build_model(cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.model, tc, self.device)
        self.batches = RecallBatches(cfg, self.opts, self.tokenizer.eos_id)
        if loaded is not None:
            checkpoint_io.load_model_weights(self.model, loaded["path"] / "model.safetensors")
            self.optimizer.load_state_dict(loaded["optimizer"])
            state = loaded["state"]
            self.step = int(state["step"])
            if "torch_rng" in state:  # written by the recall loop before the run shell
                self.batches.load_state_dict({"rng": state["rng"]})
                torch.set_rng_state(state["torch_rng"])
            else:
                self.batches.load_state_dict(state["data"])
                set_rng_state(state["rng"])
            self.history = list(state.get("history", []))
            self.run.check_resumed(self, resume_path)
        self.resumed_from = resume_path
        self.examples = _eval_examples(list(self.opts.eval_lengths), self.opts.eval_examples)
        self.logger = self.run.open_logger(self.step if loaded is not None else None)

    # the run shell's hooks

    def state(self) -> dict[str, Any]:
        from neuroplastic.runtime import rng_state

        return {"step": self.step, "data": self.batches.state_dict(), "rng": rng_state(),
                "history": self.history}

    def state_finite(self) -> bool:
        from neuroplastic.training import checkpoint as ckpt

        return ckpt.state_is_finite(self.model, self.optimizer)

    def checkpoint_payload(self):
        return self.model, self.optimizer.state_dict()

    def train_step(self) -> dict[str, Any]:
        from neuroplastic.training.optim import lr_at

        tc = self.cfg.train
        x, y, w, block = self.batches.next_batch(self.step)
        x, y, w = x.to(self.device), y.to(self.device), w.to(self.device)
        lr = lr_at(self.step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logits, _ = self.model(x)
        loss = weighted_loss(logits, y, w)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            self.run.save(self)  # the state before this step (refused if not finite)
            raise UserError(
                f"The recall loss was not finite at step {self.step + 1}; lower train.lr "
                f"(now {tc.lr}). The last good state (step {self.step}) is saved in "
                f"{str(self.run.ckpt_dir)!r}; resume from it with --resume."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.optimizer.step()
        # a finite loss does not mean finite weights: one fused check every
        # train.log_interval steps (as the trainer) and before every save
        if (self.step + 1) % tc.log_interval == 0:
            self.run.guard_finite(self.step + 1, loss_value, self.state_finite())
        self.step += 1
        return {"loss": loss_value, "lr": lr, "block": block, "tokens": x.numel()}

    def log_extras(self, tokens_per_s: float) -> dict[str, Any]:
        return {}

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        exact = {k: v for k, v in self.last_eval.items() if k.endswith("exact")}
        return {"loss": f"{record['loss']:.3f}", **exact}

    def after_step(self) -> None:
        tc = self.cfg.train
        every = tc.eval_interval > 0 and self.step % tc.eval_interval == 0
        if every or self.step == tc.max_steps:
            res = quick_recall_eval(self.model, self.examples, self.device)
            self.last_eval = {k: round(v, 4) for k, v in res.items()}
            self.history.append({"step": self.step, **self.last_eval})
            self.logger.log("eval", self.step, **self.last_eval)
            if tc.eval_interval > 0:
                self.echo(f"step {self.step} | "
                          + " ".join(f"{k} {v:.2f}" for k, v in self.last_eval.items()))

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (f"model: {self.cfg.model.gpt.n_layer} layers x {self.cfg.model.gpt.n_embd} dim, "
                f"{n / 1e6:.2f}M params | data: fresh needle documents (byte tokenizer) | "
                f"device: {self.device}")

    def train(self) -> dict[str, Any]:
        """Train to ``train.max_steps``; a summary with the run dir, the last checkpoint,
        the last quick evaluation and the eval history."""

        self.setup()
        with self.run.session():
            self.model.train()
            summary = self.run.loop(self, self.cfg.train.max_steps, progress=self.progress)
            self.logger.close()
        return {"run_dir": str(self.run_dir), "step": self.step,
                "checkpoint": str(checkpoint_io.latest_checkpoint(self.run.ckpt_dir)),
                "last_eval": dict(self.last_eval), "history": self.history, **summary}


def train_recall(cfg: RunConfig, echo=print, progress: bool | None = None) -> dict[str, Any]:
    """Run the recall recipe (module docstring) in the run shell; returns
    :meth:`RecallStep.train`'s summary (``already_complete`` when resumed at the end)."""
    step = RecallStep(cfg, echo=echo, progress=progress).setup()
    if step.resumed_from is not None:
        echo(f"resuming from {step.resumed_from} (step {step.step})")
        if step.step >= cfg.train.max_steps:
            step.logger.close()
            step.close()
            echo(f"Nothing to train: {step.resumed_from} is already at train.max_steps="
                 f"{step.step}; raise train.max_steps to train further.")
            return {"run_dir": str(step.run_dir), "checkpoint": str(step.resumed_from),
                    "step": step.step, "last_eval": dict(step.history[-1]) if step.history else {},
                    "history": step.history, "interrupted": False, "exit_code": 0,
                    "already_complete": True}
    return step.train()


class RecallRecipe(Recipe):
    """``recipe_module: recall``: the :class:`RecallStep` strategy instead of the trainer."""

    def strategy(self, cfg: RunConfig, echo=None) -> RecallStep:
        return RecallStep(cfg, echo=echo)

    def callbacks(self, ctx) -> list:
        raise UserError(
            "The recall recipe (recipe_module: recall) has its own training loop step "
            "(RecallStep); start it with `neuroplastic train RECIPE`, not through the "
            "language-model trainer."
        )


RECIPE = RecallRecipe()
