"""EWC + Hebbian on LoRA inside a plain ``transformers.Trainer`` run (copy-paste example).

Continual fine-tuning in two phases with one plasticity engine:

1. task A (GSM8K problems; synthetic multiplication word problems without the file):
   LoRA fine-tuning with a Hebbian (Oja) rule on the LoRA down-projections, while EWC
   collects the squared gradients of the LoRA weights;
2. EWC consolidates (Fisher = mean squared gradient of task A, anchor = the weights now);
3. task B (synthetic addition/subtraction problems): the same, plus the EWC penalty in
   the loss (``NeuroplasticTrainer`` adds ``engine.penalty()``), which holds the weights
   that matter for task A.

It prints the held-out task-A loss before, after A and after B (the forgetting), and
the plasticity stats the Trainer logged. Run it as

    PYTHONPATH=src python examples/hf_trainer_callback.py /path/to/smollm2-135m-instruct \\
        --steps 5 --data-dir /path/to/shared/data

(docs/HF_TRAINER.md shows its output on SmolLM2-135M-Instruct; tests/test_hf_trainer_example.py
runs it on a tiny model.)
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import TrainingArguments

from neuroplastic.data.cot import CotFormatter, load_cot_examples, split_examples
from neuroplastic.models.hf import apply_lora, load_causal_lm
from neuroplastic.plasticity import EWC, Hebbian
from neuroplastic.training.hf_callback import NeuroplasticTrainer


def encode(tokenizer, examples, max_len=384):
    """``{"input_ids", "labels"}`` per example: the loss is on the answer tokens only."""
    fmt = CotFormatter(tokenizer)
    rows = []
    for ex in examples:
        enc = fmt.encode(ex, max_len)
        if enc is not None:
            rows.append({"input_ids": enc.ids, "labels": enc.labels})
    return rows


def collate(pad_id):
    def fn(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return fn


def task(spec, tokenizer, data_dir, n_train, n_eval):
    train, held_out = split_examples(load_cot_examples(spec, data_dir), 0.05, 0, 200)
    return encode(tokenizer, train[:n_train]), encode(tokenizer, held_out[:n_eval])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a local Hugging Face causal LM directory")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per task")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--ewc-lambda", type=float, default=1000.0)
    ap.add_argument("--data-dir", help="folder holding gsm8k/train.jsonl")
    ap.add_argument("--task-a", default="gsm8k", help="gsm8k, a .jsonl, arith or arith-mul")
    ap.add_argument("--out", default="runs/hf-trainer-example")
    ap.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, tok = load_causal_lm(args.model)
    model = apply_lora(model, r=8, alpha=16)  # only the LoRA weights train
    try:
        task_a = task(args.task_a, tok, args.data_dir, args.steps * args.batch_size, 16)
    except Exception as exc:  # no GSM8K file here: synthetic problems instead
        print(f"task A: {args.task_a} unavailable ({exc}); using arith-mul")
        task_a = task("arith-mul", tok, None, args.steps * args.batch_size, 16)
    task_b = task("arith", tok, None, args.steps * args.batch_size, 16)

    # EWC and Hebbian on the LoRA weights; EWC reads the gradients of every step. The
    # first Trainer builds the engine at train begin (after it has moved the model to its
    # device); the second reuses it with its own optimizer.
    ewc = EWC(params="*lora_*", lam=args.ewc_lambda, collect_grads=True)
    hebbian = Hebbian(params="*lora_A*", lr=1e-5, max_update_norm=0.01)

    def trainer_for(train_rows, name, **plasticity):
        targs = TrainingArguments(
            output_dir=f"{args.out}/{name}", max_steps=args.steps,
            per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=8,
            learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1,
            save_strategy="no", report_to="none", seed=0, use_cpu=args.cpu,
            disable_tqdm=True, dataloader_pin_memory=False, remove_unused_columns=False,
        )
        return NeuroplasticTrainer(model=model, args=targs, train_dataset=train_rows,
                                   data_collator=collate(tok.pad_token_id or 0), **plasticity)

    def task_a_loss(trainer):
        return trainer.evaluate(eval_dataset=task_a[1])["eval_loss"]

    trainer = trainer_for(task_a[0], "task_a", rules=[ewc, hebbian])
    before = task_a_loss(trainer)
    trainer.train()
    after_a = task_a_loss(trainer)
    ewc.consolidate_from_grads()  # Fisher of task A from the gradients EWC collected
    history = [("A", h) for h in trainer.state.log_history if "loss" in h]

    trainer = trainer_for(task_b[0], "task_b", engine=trainer.engine)
    trainer.train()
    after_b = task_a_loss(trainer)
    history += [("B", h) for h in trainer.state.log_history if "loss" in h]

    for phase, h in history:
        stats = {k.split("/", 1)[1]: v for k, v in h.items() if k.startswith("plasticity/")}
        shown = ", ".join(f"{k} {v:.3g}" for k, v in sorted(stats.items()))
        print(f"task {phase} step {h['step']:>3}: loss {h['loss']:.4f}  {shown}")
    print(f"held-out task-A loss: before {before:.4f}, after A {after_a:.4f}, "
          f"after B {after_b:.4f} (forgetting {after_b - after_a:+.4f})")
    with torch.no_grad():
        penalty = float(ewc.penalty())
    trainer.engine.close()
    return {"before": before, "after_a": after_a, "after_b": after_b, "history": history,
            "penalty": penalty}


if __name__ == "__main__":
    result = main()
    assert all(math.isfinite(result[k]) for k in ("before", "after_a", "after_b"))
