"""neuroplastic-cot: chain-of-thought fine-tuning (LoRA) with adaptive LR, EWC and Hebbian.

The recipe module of ``neuroplastic-cot.yaml`` (``recipe_module: cot``). It plugs into
the one trainer and changes three things:

* **Data.** The trainer's token stream is replaced by question/answer examples
  (:mod:`neuroplastic.data.cot`): chat-formatted when the tokenizer has a template,
  loss on the answer tokens only, right-padded batches of one task at a time.
  ``options.tasks`` is a *sequence* of tasks (default: ``[data.source]``), e.g.
  ``[gsm8k, arith]``: task A for the first share of ``train.max_steps``, then task B
  (``options.boundaries``: the fractions where the task changes; default equal shares).
  The validation split (the trainer's evaluation, best checkpoint) is the held-out examples
  of all tasks.
* **Adaptive learning rate by reasoning complexity.** Every ``adaptive_lr`` rule of
  ``plasticity.rules`` gets the mean complexity of the step's batches
  (``options.complexity``: ``steps``, ``operations``, ``numbers``, ``tokens``; ``loss``
  keeps the rule's own loss signal), and its loss signal is switched off
  (``use_loss=False``): the lr multiplier is ``clip(1 + s (c/mean - 1))`` of that
  complexity. With ``loss`` the rule's loss signal is switched on instead.
* **EWC across tasks.** When the task changes, every rule with ``consolidate`` (EWC)
  estimates the Fisher on the task just finished (``options.fisher_batches`` batches of
  its training examples, model in eval mode) and anchors the parameters; the penalty
  then holds the weights that matter for task A while task B trains.
  ``options.ewc_every = N`` also consolidates every N steps within a task on the
  current task's data (the seed system's ``fisher_update_freq`` schedule; online EWC
  with the rule's ``gamma``).

Hebbian needs nothing from this module: a ``hebbian`` rule with ``params: "*lora_A*"``
runs Oja's rule on the LoRA down-projections from their own activations.

Logged to ``metrics.jsonl`` (what the plots of :mod:`neuroplastic.evaluation.cot` read):
``kind: "cot"`` every step (complexity, lr multiplier, Hebbian update norm, EWC penalty,
task, loss), ``kind: "cot_eval"`` the loss of each task's held-out examples every
``options.eval_every`` steps (default ``train.eval_interval``), at step 0, at each task
change and at the end (forgetting curves), ``kind: "consolidate"`` each consolidation;
and ``fisher.json`` (mean Fisher per parameter, and per layer) at the end of training.

The callback is an observer (``phase = OBSERVE``: it runs after the plasticity
engine), so its ``after_step`` sees the Hebbian update and the lr multiplier
of the step just taken, and consolidates after every plastic update of that step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroplastic.config import build_dataclass
from neuroplastic.data.cot import (
    COMPLEXITY_MEASURES,
    DEFAULT_INSTRUCTION,
    CotBatches,
    CotFormatter,
    encode_examples,
    eval_batches,
    load_cot_examples,
    split_examples,
)
from neuroplastic.errors import UserError
from neuroplastic.models.api import forward_targets
from neuroplastic.recipes import Recipe
from neuroplastic.training.callbacks import OBSERVE, Callback, StepContext


@dataclass
class CotOptions:
    tasks: list[str] = dataclasses.field(default_factory=list)  # [] -> [data.source]
    boundaries: list[float] = dataclasses.field(default_factory=list)  # [] -> equal shares
    complexity: str = "steps"  # steps | operations | numbers | tokens | loss
    instruction: str = DEFAULT_INSTRUCTION
    system: str = ""
    chat: str = "auto"  # auto | true | false
    question_field: str = "question"
    answer_field: str = "answer"
    val_fraction: float = 0.05
    max_val: int = 200  # held-out examples per task (at most)
    max_train: int = 0  # training examples per task (0: all)
    eval_examples: int = 32  # held-out examples per task in the loss curves
    eval_every: int = 0  # 0: train.eval_interval
    ewc_every: int = 0  # 0: consolidate only when the task changes
    fisher_batches: int = 8
    synthetic_size: int = 2000
    split_seed: int = 0

    def validate(self) -> CotOptions:
        if self.complexity not in COMPLEXITY_MEASURES:
            raise UserError(
                f"options.complexity must be one of {', '.join(COMPLEXITY_MEASURES)}; got "
                f"{self.complexity!r}."
            )
        if str(self.chat).lower() not in ("auto", "true", "false"):
            raise UserError(f"options.chat must be auto, true or false; got {self.chat!r}.")
        b = self.boundaries
        if b and (any(not 0 < x < 1 for x in b) or b != sorted(b)):
            raise UserError("options.boundaries must be increasing fractions in (0, 1).")
        for key in ("max_val", "max_train", "eval_examples", "eval_every", "ewc_every"):
            if getattr(self, key) < 0:
                raise UserError(f"options.{key} must be >= 0, got {getattr(self, key)}.")
        if self.fisher_batches < 1 or self.synthetic_size < 2:
            raise UserError("options.fisher_batches must be >= 1 and options.synthetic_size >= 2.")
        return self

    @property
    def chat_mode(self) -> bool | str:
        c = str(self.chat).lower()
        return "auto" if c == "auto" else c == "true"


def task_names(specs: list[str]) -> list[str]:
    """Short unique names of task specs (a file's stem, else the spec itself)."""
    names: list[str] = []
    for spec in specs:
        p = Path(spec)
        base = p.stem if p.suffix else spec
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base) or "task"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _model_tokenizer(ctx: StepContext) -> Any:
    """The HF tokenizer of an HFCausalLM (chat template), else the run's own tokenizer."""
    tok = getattr(ctx.model, "tokenizer", None)
    return tok if tok is not None else ctx.tokenizer


class CotCallback(Callback):
    """Chain-of-thought data, complexity for ALR, EWC between tasks, logs (module docs)."""

    name = "cot"
    phase = OBSERVE  # after the plasticity engine

    def __init__(self, ctx: StepContext, options: CotOptions):
        from neuroplastic.plasticity.adaptive_lr import AdaptiveLR

        self.opt = options
        cfg = ctx.cfg
        specs = list(options.tasks) or [cfg.data.source]
        self.names = task_names(specs)
        self.specs = dict(zip(self.names, specs))
        tok = _model_tokenizer(ctx)
        self.formatter = CotFormatter(
            tok, instruction=options.instruction, system=options.system or None,
            chat=options.chat_mode,
        )
        self.pad_id = self.formatter.codec.pad_id
        max_len = cfg.block_size + 1  # inputs and targets are block_size long
        self.train_sets, self.val_sets = {}, {}
        self.examples = {}
        for name, spec in self.specs.items():
            examples = load_cot_examples(
                spec, cfg.data.data_dir or None, question_field=options.question_field,
                answer_field=options.answer_field, synthetic_size=options.synthetic_size,
                seed=options.split_seed,
            )
            train, val = split_examples(examples, options.val_fraction, options.split_seed,
                                        options.max_val)
            if options.max_train:
                train = train[: options.max_train]
            self.examples[name] = (train, val)
            self.train_sets[name] = encode_examples(self.formatter, train, max_len, options.complexity)
            self.val_sets[name] = encode_examples(
                self.formatter, val[: options.eval_examples or len(val)], max_len, options.complexity
            )
        bs = cfg.train.batch_size
        self.batches = CotBatches(self.train_sets, bs, self.pad_id, seed=cfg.train.seed)
        self.eval_sets = {
            n: eval_batches(v, bs, self.pad_id) for n, v in self.val_sets.items() if v
        }
        if not self.eval_sets:
            raise UserError("No held-out chain-of-thought example fits the context; raise model.block_size.")

        max_steps = cfg.train.max_steps
        fractions = list(options.boundaries) or [i / len(self.names) for i in range(1, len(self.names))]
        if len(fractions) != len(self.names) - 1:
            raise UserError(
                f"options.boundaries needs {len(self.names) - 1} values (one per task change), "
                f"got {len(fractions)}."
            )
        self.starts = [0] + [max(1, round(f * max_steps)) for f in fractions]
        self.engine = ctx.engine
        self.alr = []
        if self.engine is not None:
            for rule in self.engine.rules:
                if not isinstance(rule, AdaptiveLR):
                    continue
                rule.use_loss = options.complexity == "loss"
                if not rule.use_loss:
                    rule.complexity_fn = self.batches.step_complexity
                self.alr.append(rule)
        self.consolidations = 0

    # ------------------------------------------------------------------ schedule

    def task_at(self, step: int) -> str:
        """The task trained at (0-based) step ``step``."""
        k = sum(1 for s in self.starts[1:] if step >= s)
        return self.names[k]

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, ctx: StepContext) -> None:
        self.batches.set_task(self.task_at(ctx.step))
        if ctx.step == 0:
            self._eval_tasks(ctx, 0)

    def after_step(self, ctx: StepContext, metrics: dict[str, Any]) -> None:
        done = ctx.step + 1  # the trainer counts the step after its callbacks
        record: dict[str, Any] = {"task": self.batches.task, "loss": metrics.get("loss")}
        c = self.batches.step_complexity()
        if math.isfinite(c):
            record["complexity"] = c
            metrics["cot/complexity"] = c
        if self.alr:
            rule = self.alr[0]
            record["lr_multiplier"] = rule.multiplier
            record["lr"] = metrics.get("lr", 0.0)  # the trainer's lr: already times the multiplier
            if self.opt.complexity == "loss":
                record["complexity"] = metrics.get("loss")
        if self.engine is not None:
            for rule in self.engine.rules:
                if rule.last_update_norm is not None:
                    record[f"{rule.name}_update_norm"] = rule.last_update_norm
            if "penalty" in metrics:
                record["ewc_penalty"] = metrics["penalty"]
        ctx.logger.log("cot", done, **record)
        self.batches.end_step()

        max_steps = ctx.cfg.train.max_steps
        nxt = self.task_at(done)
        switched = nxt != self.batches.task and done < max_steps
        if switched:
            self._consolidate(ctx, self.batches.task, done)
            self.batches.set_task(nxt)
            ctx.echo(f"[step {done}] task: {self.specs[record['task']]} -> {self.specs[nxt]}")
        elif self.opt.ewc_every and done % self.opt.ewc_every == 0 and done < max_steps:
            self._consolidate(ctx, self.batches.task, done)
        every = self.opt.eval_every or ctx.cfg.train.eval_interval
        if switched or done == max_steps or (every and done % every == 0):
            self._eval_tasks(ctx, done)
        if done == max_steps:
            self.write_fisher(ctx.run_dir / "fisher.json")

    # ------------------------------------------------------------------ pieces

    def _ewc_rules(self) -> list:
        if self.engine is None:
            return []
        return self.engine.consolidating()

    def _consolidate(self, ctx: StepContext, task: str, step: int) -> None:
        rules = self._ewc_rules()
        if not rules:
            return
        batches = eval_batches(
            self.train_sets[task][: self.opt.fisher_batches * ctx.cfg.train.batch_size],
            ctx.cfg.train.batch_size, self.pad_id,
        )
        device = ctx.device

        def loss_fn(model, batch):
            x, y = batch
            with ctx.autocast():
                return forward_targets(model, x.to(device), y.to(device))[1]

        was_training = ctx.model.training
        ctx.model.eval()  # no dropout in the Fisher; Hebbian hooks record nothing
        try:
            for rule in rules:
                rule.consolidate(batches, loss_fn)
        finally:
            ctx.model.train(was_training)
        self.consolidations += 1
        ctx.logger.log("consolidate", step, task=task, rules=",".join(r.name for r in rules),
                           batches=len(batches))

    def task_losses(self, ctx: StepContext) -> dict[str, float]:
        from neuroplastic.evaluation.lm import lm_metrics

        return {
            name: lm_metrics(ctx.model, batches, ctx.byte_lengths, ctx.device, ctx.autocast)["loss"]
            for name, batches in self.eval_sets.items()
        }

    def _eval_tasks(self, ctx: StepContext, step: int) -> None:
        losses = self.task_losses(ctx)
        ctx.logger.log("cot_eval", step, task=self.batches.task,
                           **{f"{k}/loss": v for k, v in losses.items()})

    def final_metrics(self, ctx: StepContext) -> dict[str, float]:
        """Held-out loss of each task (for ``neuroplastic ablate``; lower is better)."""
        return {f"{name}_loss": v for name, v in self.task_losses(ctx).items()}

    def fisher(self) -> dict[str, Any] | None:
        """Mean Fisher per parameter and per layer of the first EWC rule that has one."""
        from neuroplastic.plasticity.ewc import EWC

        for rule in self._ewc_rules():
            if not isinstance(rule, EWC):
                continue
            fisher = rule.fisher
            if rule.online and fisher is not None:
                per_param = {n: float(f.float().mean()) for n, f in zip(rule.names, fisher)}
            elif not rule.online and fisher:
                per_param = {n: float(sum(float(t[i].float().mean()) for t in fisher))
                             for i, n in enumerate(rule.names)}
            else:
                continue
            return {"rule": rule.name, "tasks": rule.tasks, "per_param": per_param,
                    "per_layer": per_layer(per_param),
                    "per_layer_module": per_layer_module(per_param)}
        return None

    def write_fisher(self, path: Path) -> Path | None:
        info = self.fisher()
        if info is None:
            return None
        path.write_text(json.dumps(info, indent=2), encoding="utf-8")
        return path

    def state_dict(self) -> dict[str, Any]:
        return {}


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def per_layer(per_param: dict[str, float]) -> dict[str, float]:
    """Mean of per-parameter values grouped by transformer layer index (``layers.N``,
    ``h.N``); parameters outside numbered layers are grouped as ``other``."""
    groups: dict[str, list[float]] = {}
    for name, v in per_param.items():
        m = _LAYER.search(name)
        key = f"layer {int(m.group(1))}" if m else "other"
        groups.setdefault(key, []).append(v)

    def order(k: str) -> tuple[int, int]:
        return (1, 0) if k == "other" else (0, int(k.split()[1]))

    return {k: sum(groups[k]) / len(groups[k]) for k in sorted(groups, key=order)}


_SKIP = {"weight", "bias", "default", "lora_A", "lora_B", "base_layer", "base_model", "model"}


def module_kind(name: str) -> str:
    """The layer type of a parameter name: ``...self_attn.q_proj.lora_A.default.weight``
    -> ``q_proj``; ``transformer.h.0.mlp.c_fc.weight`` -> ``c_fc``."""
    parts = [p for p in name.split(".") if p not in _SKIP and not p.isdigit()]
    return parts[-1] if parts else name


def per_layer_module(per_param: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{layer: {module kind: mean}}`` (see :func:`per_layer` and :func:`module_kind`)."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, v in per_param.items():
        m = _LAYER.search(name)
        layer = f"layer {int(m.group(1))}" if m else "other"
        out.setdefault(layer, {}).setdefault(module_kind(name), []).append(v)
    order = list(per_layer(per_param))
    return {k: {mod: sum(vs) / len(vs) for mod, vs in out[k].items()} for k in order}


class CotRecipe(Recipe):
    """``recipe_module: cot``: the gradient trainer on chain-of-thought batches, plus a
    :class:`CotCallback` (an observer: it runs after the plasticity engine)."""

    def callbacks(self, ctx: StepContext) -> list[Callback]:
        opts = build_dataclass(CotOptions, dict(ctx.cfg.options), "options").validate()
        cb = CotCallback(ctx, opts)
        # the chain-of-thought batches; validation: the held-out examples of every task
        ctx.use_data(cb.batches, {"val": [b for v in cb.eval_sets.values() for b in v]})
        return [cb]


RECIPE = CotRecipe()
