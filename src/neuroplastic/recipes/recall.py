"""Recall training: teach a byte-level model to find a needle (``recipe_module: recall``).

``neuroplastic train needle-recall`` runs this loop instead of the language-model
trainer, because recall needs two things that trainer does not do:

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
trainer's format, so ``evaluate``/``generate`` read them, and ``--resume`` continues a run
exactly (model, optimizer, step and the document generator's state). It uses
``train.max_steps``, ``batch_size`` (rows of ``short_block`` bytes; the long phase keeps the
bytes per step), ``lr``/``min_lr``/``warmup_steps``, the AdamW settings, ``grad_clip``,
``seed``, ``device`` and the interval keys; it runs in float32 on one process (``amp``,
``grad_accum``, ``compile`` and the plasticity/reward sections do not apply here).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neuroplastic.config import RunConfig, build_dataclass, dump_config
from neuroplastic.data import recall_tasks
from neuroplastic.errors import UserError

__all__ = ["RecallOptions", "callbacks", "quick_recall_eval", "recall_batch", "train_recall"]


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


# --------------------------------------------------------------------------- loop


def _rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def train_recall(cfg: RunConfig, echo=print, progress: bool | None = None) -> dict[str, Any]:
    """Run the recall recipe (module docstring); returns a summary with the run dir, the
    last quick evaluation and the eval history.

    Like the trainer's: one writer per run directory (a lock), SIGTERM / Ctrl-C finish the
    step, save and return with ``interrupted`` and the ``exit_code`` (143 / 130) the command
    line exits with, and parameters or optimizer state that are not finite are never saved.
    """
    from neuroplastic.training import checkpoint as ckpt
    from neuroplastic.training.trainer import check_writable

    opts = build_dataclass(RecallOptions, dict(cfg.options), "options").validate(cfg)
    if cfg.data.tokenizer != "byte":
        raise UserError(
            f"The recall recipe trains on bytes (the answer weights are byte offsets); set "
            f"data.tokenizer=byte instead of {cfg.data.tokenizer!r}."
        )
    if cfg.model.arch == "hf":
        raise UserError("The recall recipe trains models from scratch; model.arch=hf is not supported.")
    tc = cfg.train
    run_dir = Path(tc.out_dir.format(name=cfg.name))
    ckpt_dir = run_dir / "checkpoints"
    check_writable(run_dir)
    lock = ckpt.RunLock(run_dir).acquire()  # one writer per run directory
    try:
        check_writable(ckpt_dir)
        for line in ckpt.clean_stale(ckpt_dir):
            echo(f"checkpoints: {line}")
        return _recall_loop(cfg, opts, run_dir, ckpt_dir, echo, progress)
    finally:
        lock.release()


def _last_good(ckpt_dir: Path) -> str:
    from neuroplastic.training import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(ckpt_dir)
    if latest is None:
        return "No checkpoint had been written yet, so there is none to resume from."
    return (f"The last good checkpoint is untouched: {latest} (step {int(latest.name[5:])}); "
            "resume from it with --resume.")


def _recall_loop(cfg: RunConfig, opts: RecallOptions, run_dir: Path, ckpt_dir: Path, echo,
                 progress: bool | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from neuroplastic.data.tokenizers import build_tokenizer
    from neuroplastic.models import build_model
    from neuroplastic.runtime import resolve_device
    from neuroplastic.training import checkpoint as ckpt
    from neuroplastic.training.metrics import MetricsLogger
    from neuroplastic.training.optim import build_optimizer, lr_at
    from neuroplastic.training.trainer import StopRequest

    tc = cfg.train
    resume_from = None
    if tc.resume in ("", "none"):
        if ckpt.list_checkpoints(ckpt_dir):
            raise UserError(
                f"Run directory {str(run_dir)!r} already holds checkpoints; continue it with "
                "train.resume=auto (or --resume), or pick another train.out_dir."
            )
    elif tc.resume == "auto":
        resume_from = ckpt.latest_checkpoint(ckpt_dir)
    else:
        resume_from = Path(tc.resume)
        if not resume_from.exists():
            raise UserError(f"Checkpoint {tc.resume!r} given in train.resume does not exist.")

    device = resolve_device(tc.device, option="train.device")
    tok = build_tokenizer("byte", lambda: iter(()), 0)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, tc, device)
    rng = random.Random(f"neuroplastic-recall-train:{tc.seed}")
    step = 0
    history: list[dict[str, Any]] = []
    if resume_from is not None:
        loaded = ckpt.load_checkpoint(resume_from)
        ckpt.load_model_weights(model, loaded["path"] / "model.safetensors")
        optimizer.load_state_dict(loaded["optimizer"])
        state = loaded["state"]
        step = int(state["step"])
        rng.setstate(_rng_from_json(state["rng"]))
        torch.set_rng_state(state["torch_rng"])
        history = list(state.get("history", []))
        if not ckpt.state_is_finite(model, optimizer):
            raise UserError(
                f"Checkpoint {str(resume_from)!r} holds non-finite parameters or optimizer "
                "state; resume from an earlier checkpoint with train.resume=PATH."
            )
        if step > tc.max_steps:
            raise UserError(
                f"Checkpoint {str(resume_from)!r} is at step {step}, past train.max_steps="
                f"{tc.max_steps}; raise train.max_steps above {step} to train further (or "
                "evaluate the checkpoint as it is)."
            )
        echo(f"resuming from {loaded['path']} (step {step})")
        if step == tc.max_steps:
            echo(f"Nothing to train: {loaded['path']} is already at train.max_steps={step}; "
                 "raise train.max_steps to train further.")
            return {"run_dir": str(run_dir), "checkpoint": str(loaded["path"]), "step": step,
                    "last_eval": dict(history[-1]) if history else {}, "history": history,
                    "interrupted": False, "exit_code": 0, "already_complete": True}
    logger = MetricsLogger(run_dir, tensorboard=tc.tensorboard,
                           resume_step=step if resume_from is not None else None)
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    examples = _eval_examples(list(opts.eval_lengths), opts.eval_examples)
    short_steps = round(opts.short_fraction * tc.max_steps)
    tokens_per_step = tc.batch_size * opts.short_block

    def save() -> Path:
        path = ckpt_dir / ckpt.checkpoint_name(step)
        if path.exists():
            return path
        if not ckpt.state_is_finite(model, optimizer):
            raise UserError(
                f"Not writing checkpoint {path.name}: the parameters or optimizer state are not "
                f"finite. {_last_good(ckpt_dir)}"
            )
        try:
            ckpt.save_checkpoint(
                path, model=model,
                state={"step": step, "rng": _rng_to_json(rng.getstate()),
                       "torch_rng": torch.get_rng_state(), "history": history},
                optimizer_state=optimizer.state_dict(), config_text=dump_config(cfg),
                tokenizer=tok,
            )
        except OSError as exc:
            latest = ckpt.latest_checkpoint(ckpt_dir)
            kept = (f"the previous checkpoint {latest} survives intact" if latest is not None
                    else "no earlier checkpoint exists")
            raise UserError(
                f"Could not write checkpoint {path} ({exc.strerror or exc}); {kept}. Free disk "
                "space or fix the directory's permissions, then resume with --resume."
            ) from exc
        ckpt.prune_checkpoints(ckpt_dir, tc.keep_last)
        return path

    def evaluate() -> dict[str, float]:
        res = {k: round(v, 4) for k, v in quick_recall_eval(model, examples, device).items()}
        history.append({"step": step, **res})
        logger.log("eval", step, **res)
        return res

    model.train()
    show = tc.progress if progress is None else progress
    # shown on a terminal and in a log file alike (redrawn rarely there), as the trainer's
    bar = tqdm(total=tc.max_steps, initial=step, desc=f"recall {cfg.name}", unit="step",
               disable=not show, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 15.0)
    last: dict[str, float] = {}
    interrupted = False
    signum = None
    try:
        with StopRequest() as stop:
            while step < tc.max_steps:
                if step < short_steps:
                    block, (lo, hi), rows = opts.short_block, opts.short_bytes, tc.batch_size
                else:
                    block, (lo, hi) = opts.long_block, opts.long_bytes
                    rows = max(1, tokens_per_step // block)
                x, y, w = recall_batch(rng, rows, block, lo, hi, opts.max_needles,
                                       opts.answer_weight, tok.eos_id)
                t0 = time.perf_counter()
                x, y, w = x.to(device), y.to(device), w.to(device)
                lr = lr_at(step, tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                logits, _ = model(x)
                nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                      reduction="none")
                loss = (nll * w.reshape(-1)).sum() / w.sum()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    save()  # the state before this step (save() refuses it if not finite)
                    raise UserError(
                        f"The recall loss was not finite at step {step + 1}; lower train.lr "
                        f"(now {tc.lr}). The last good state (step {step}) is saved in "
                        f"{str(ckpt_dir)!r}; resume from it with --resume."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                # a finite loss does not mean finite weights: one fused check every
                # train.log_interval steps (as the trainer) and before every save
                if (step + 1) % max(1, tc.log_interval) == 0 and not ckpt.state_is_finite(model, optimizer):
                    logger.log("nonfinite_state", step + 1, loss=loss_value)
                    raise UserError(
                        f"The parameters or optimizer state are non-finite after step {step + 1} "
                        f"although the loss was finite ({loss_value:.4g}); nothing non-finite was "
                        f"saved. {_last_good(ckpt_dir)} Lower train.lr or set train.grad_clip > 0."
                    )
                step += 1
                if step % max(1, tc.log_interval) == 0:
                    logger.log("train", step, loss=loss_value, lr=lr, block=block,
                               tokens_per_s=round(x.numel() / max(1e-9, time.perf_counter() - t0), 1))
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}",
                                **{k: v for k, v in last.items() if k.endswith("exact")})
                if tc.eval_interval > 0 and (step % tc.eval_interval == 0 or step == tc.max_steps):
                    last = evaluate()
                    echo(f"step {step} | " + " ".join(f"{k} {v:.2f}" for k, v in last.items()))
                if tc.ckpt_interval > 0 and step % tc.ckpt_interval == 0:
                    save()
                if stop.requested:
                    interrupted, signum = True, stop.signum
                    break
    finally:
        bar.close()
    if interrupted:
        path = save()
        logger.close()
        echo(f"Stopped at step {step}; checkpoint saved. Resume with --resume.")
        return {"run_dir": str(run_dir), "checkpoint": str(path), "step": step, "last_eval": last,
                "history": history, "interrupted": True,
                "exit_code": StopRequest.exit_code(signum)}
    if not last and tc.max_steps > 0:
        last = evaluate()
    path = save()
    logger.close()
    return {"run_dir": str(run_dir), "checkpoint": str(path), "step": step, "last_eval": last,
            "history": history, "interrupted": False, "exit_code": 0}



def callbacks(trainer) -> list:
    """The language-model trainer cannot run this recipe: it has its own loop."""
    raise UserError(
        "The recall recipe (recipe_module: recall) runs its own training loop; start it with "
        "`neuroplastic train RECIPE`, not through the language-model trainer."
    )
