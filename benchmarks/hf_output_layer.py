"""A Hugging Face LoRA fine-tuning step with the output layer over every position vs only
from the first position that holds a target (``targets_only``, what the trainer does).

Supervised chain-of-thought batches mask the prompt (and the padding) with ``-100``; the
output layer (a ``hidden x vocab`` matmul, 49,152 entries for SmolLM2) and its float32
softmax over those positions are work whose result the loss never reads.
:func:`neuroplastic.models.api.forward_targets` asks the model for logits only at the
target positions (Llama, Qwen2, GPT-2: a pre-hook on the output layer; other families:
from the first position where some row has a target, ``logits_to_keep``). Both arms
train the same LoRA model (r=8 on all attention and MLP projections, AdamW) on the same
real batches (GSM8K train problems, formatted and masked by the cot recipe's own
``CotFormatter``/``collate``), alternating step by step; the table gives the median step
time of each arm and checks that both arms' losses on the first batch agree.

    python benchmarks/hf_output_layer.py --model smollm2-135m-instruct --data-dir ../shared/data \\
        --threads 2 --amp bf16 --write-docs
    python benchmarks/hf_output_layer.py --model tiny --steps 2   # a tiny random Qwen2 (smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _docs import write_section  # noqa: E402
from _machine import cpu_model  # noqa: E402

from neuroplastic.data.cot import (  # noqa: E402
    CotFormatter,
    collate,
    encode_examples,
    load_cot_examples,
    synthetic_arithmetic,
)
from neuroplastic.models.api import forward_targets  # noqa: E402
from neuroplastic.models.hf import (  # noqa: E402
    HEAD_SELECT_TYPES,
    HFCausalLM,
    apply_lora,
    load_causal_lm,
)
from neuroplastic.models.registry import is_registry_name, resolve_model  # noqa: E402

DOCS = ROOT / "docs" / "BENCHMARKS.md"
KEY = "hf-output-layer"


def tiny_model(directory: Path) -> Path:
    """A tiny random Qwen2 with a small BPE tokenizer and a chat template, saved locally."""
    import transformers

    from neuroplastic.data.tokenizers import BPETokenizer

    text = " ".join(f"{e.question} {e.answer}" for e in synthetic_arithmetic(200))
    tok = BPETokenizer.train([text], vocab_size=400)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, vocab_size=tok.vocab_size,
        bos_token_id=0, eos_token_id=0,
    ))
    model.save_pretrained(str(directory))
    tok.save(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="a registry name, a local HF directory, or tiny (a random Qwen2)")
    ap.add_argument("--data", default="gsm8k", help="cot data (gsm8k, a .jsonl, arith)")
    ap.add_argument("--data-dir", default=None, help="folder searched first for registry data")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per arm (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--amp", choices=["none", "bf16"], default="none")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            path = tiny_model(Path(tmp))
        elif is_registry_name(args.model):
            path = resolve_model(args.model)
        else:
            path = args.model
        model, tok = load_causal_lm(path)
        data = "arith" if args.model == "tiny" and args.data == "gsm8k" else args.data
        model = apply_lora(model, r=8, alpha=16, dropout=0.05)
        lm = HFCausalLM(model, tok).train()
        formatter = CotFormatter(tok)
        n = args.batch_size * (args.steps + 1)
        examples = load_cot_examples(data, args.data_dir)[:n]
        encoded = encode_examples(formatter, examples, args.block_size + 1)
        batches = [collate(encoded[i:i + args.batch_size], formatter.codec.pad_id)
                   for i in range(0, len(encoded) - args.batch_size + 1, args.batch_size)]
        if len(batches) < 2:
            raise SystemExit(f"{data}: too few examples fit block size {args.block_size}.")
        opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=5e-4)

        def autocast():
            if args.amp == "bf16":
                return torch.autocast("cpu", dtype=torch.bfloat16)
            return contextlib.nullcontext()

        arms = {"all positions": lambda x, y: lm(x, y),
                "targets only": lambda x, y: forward_targets(lm, x, y)}
        lm.eval()
        with torch.no_grad(), autocast():  # same loss from both arms
            first = {name: float(f(*batches[0])[1]) for name, f in arms.items()}
        lm.train()
        times: dict[str, list[float]] = {name: [] for name in arms}
        kept: list[float] = []
        for i, (x, y) in enumerate(batches):
            if lm.config.model_type in HEAD_SELECT_TYPES:  # the target positions alone
                kept.append(float((y != -100).float().mean()))
            else:  # from the first position holding a target
                kept.append(1.0 - int((y != -100).any(0).to(torch.int8).argmax()) / y.size(1))
            for name in (list(arms) if i % 2 == 0 else list(arms)[::-1]):
                t0 = time.perf_counter()
                with autocast():
                    _, loss = arms[name](x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i > 0:  # the first batch warms up
                    times[name].append(time.perf_counter() - t0)
                print(f"  batch {i} {tuple(x.shape)} {name}: {time.perf_counter() - t0:.2f} s",
                      file=sys.stderr, flush=True)

    med = {name: statistics.median(v) for name, v in times.items()}
    cmd = "python benchmarks/hf_output_layer.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    rows = [
        "| arm | median s/step | ratio | loss on batch 0 |",
        "|---|---|---|---|",
        *(f"| {name} | {med[name]:.2f} | {med[name] / med['all positions']:.3f}x | {first[name]:.6f} |"
          for name in arms),
    ]
    body = "\n".join([
        "### Hugging Face LoRA step: output layer over the answer only (benchmarks/hf_output_layer.py)",
        "",
        f"Command: `{cmd}`  ",
        f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{_dt.datetime.now(_dt.UTC):%Y-%m-%d}; model {args.model} with LoRA r=8 on all "
        f"attention and MLP projections, AdamW; {data} batches of {args.batch_size} "
        f"(cot recipe formatting, prompt masked), amp {args.amp}; {len(times['targets only'])} "
        f"timed steps per arm, alternating; the output layer ran over {statistics.mean(kept):.0%} "
        "of the positions on average with `targets_only`.",
        "",
        *rows,
    ])
    print(body)
    if args.write_docs:
        write_section(DOCS, KEY, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
