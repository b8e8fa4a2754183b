"""The ``neuroplastic neurogen`` subcommands: ``train``, ``generate`` and ``ablate``.

Only argument definitions live at import time (the parser is built for every command);
the work is imported when a subcommand runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from neuroplastic.errors import UserError

MECHANISM_NAMES = ("thalamic_gating", "working_memory", "hippocampus", "basal_ganglia", "embedding_relay",
                   "three_factor", "tagging", "homeostasis", "replay")


def add_neurogen_parser(sub, parser_class) -> argparse.ArgumentParser:
    ng = sub.add_parser("neurogen", help="NeuroGen modular brain LM: train, generate, ablate")
    ngs = ng.add_subparsers(dest="neurogen_command", metavar="SUBCOMMAND", parser_class=parser_class)

    t = ngs.add_parser("train", help="stream a corpus through the brain (the seed's train_slimpajama.py)")
    t.add_argument("--data", default="tinyshakespeare",
                   help="registry name (slimpajama streams), text/jsonl file or folder, or hf:NAME (default tinyshakespeare)")
    t.add_argument("--field", default="text", help="jsonl / dataset field holding the text")
    t.add_argument("--data-dir", help="directory searched first for named corpora")
    t.add_argument("--tokenizer", default="byte",
                   help="byte, bpe (trained on the stream's start), or a path to GPT-2 files (vocab.json + merges.txt) / tokenizer.json")
    t.add_argument("--bpe-vocab-size", type=int, default=4096)
    t.add_argument("--tokens-per-chunk", type=int, default=4096, help="tokens per training step (default 4096)")
    t.add_argument("--max-chunks", type=int, default=0, help="stop after this many steps (default 0: when the data ends)")
    t.add_argument("--max-seq-length", type=int, default=256, help="tokens per stream; a chunk is cut into streams (default 256)")
    t.add_argument("--checkpoint-interval", type=int, default=100, help="steps between checkpoints (default 100)")
    t.add_argument("--log-interval", type=int, default=10, help="steps between log records (default 10)")
    t.add_argument("--out", default="runs/neurogen", help="run directory (default runs/neurogen)")
    r = t.add_mutually_exclusive_group()
    r.add_argument("--resume", dest="resume", action="store_true", default=None,
                   help="continue from the latest checkpoint in the run directory")
    r.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over (removes the run directory's checkpoints)")
    t.add_argument("--init-from", help="start a new run from this checkpoint (a checkpoint or a run directory; fine-tuning)")
    t.add_argument("--lr", type=float, help="learning rate of the readout and embeddings")
    t.add_argument("--embedding-dim", type=int, default=None,
                   help="embedding size of a new run (default 512; on --resume the checkpoint's is used)")
    t.add_argument("--scale", type=float, default=None,
                   help="neurons per module = seed size x scale (default 1: 79,872; on --resume the checkpoint's is used)")
    t.add_argument("--gpu-device", type=int, default=0, help="CUDA device, -1 for the CPU (default 0, CPU if no CUDA)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="brain setting for a new run, e.g. --set hippocampus=false --set activity=lif (repeat)")
    t.add_argument("--eval-data", help="held-out text source; its loss is logged at every checkpoint")
    t.add_argument("--eval-tokens", type=int, default=16384)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    t.add_argument("--no-progress", dest="progress", action="store_false")

    g = ngs.add_parser("generate", help="continue a prompt with a trained brain")
    g.add_argument("checkpoint", help="checkpoint (step_NNNNNNN/ or a single file), or a run directory (its latest checkpoint)")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-length", type=int, default=100, help="new tokens (default 100)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tokenizer", help="tokenizer directory (default: the run's tokenizer/)")

    a = ngs.add_parser("ablate", help="full brain vs each mechanism switched off, over seeds, with 95%% CIs")
    a.add_argument("--mechanism", action="append", required=True,
                   help=f"mechanism to switch off (repeat or comma-separate; 'all'): {', '.join(MECHANISM_NAMES)}")
    a.add_argument("--seeds", type=int, default=3)
    a.add_argument("--data", default="tinyshakespeare")
    a.add_argument("--data-dir")
    a.add_argument("--tokenizer", default="byte")
    a.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    a.add_argument("--batch-size", type=int, default=32, help="streams per step (default 32)")
    a.add_argument("--seq-len", type=int, default=64, help="tokens per stream (default 64)")
    a.add_argument("--embedding-dim", type=int, default=128)
    a.add_argument("--scale", type=float, default=1.0, help="brain scale (default 1: the full brain)")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="brain setting for all arms (repeat)")
    a.add_argument("--out", default="runs/neurogen-ablate")
    ng.set_defaults(neurogen_parser=ng)
    return ng


def run(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    cmd = getattr(args, "neurogen_command", None)
    if cmd == "train":
        return _train(args, echo)
    if cmd == "generate":
        return _generate(args)
    if cmd == "ablate":
        return _ablate(args, echo)
    args.neurogen_parser.print_help()
    return 2


def _resume_size_note(args) -> str | None:
    """A note when --embedding-dim / --scale are given with --resume: the checkpoint decides them."""
    from pathlib import Path

    from neuroplastic.neurogen.train import brain_config, list_checkpoints

    given = {k: v for k, v in (("embedding-dim", args.embedding_dim), ("scale", args.scale)) if v is not None}
    if args.resume is not True or not given:
        return None
    found = list_checkpoints(Path(args.out) / "checkpoints")
    if not found:
        return None  # no checkpoint: the run starts new and uses the options
    config = brain_config(found[-1][1])
    saved = {"embedding-dim": config.get("embedding_dim"), "scale": config.get("scale")}
    parts = [f"--{k} {v} (the checkpoint has {saved[k]})" for k, v in given.items()
             if saved[k] is None or float(v) != float(saved[k])]
    if not parts:
        return None
    return (f"note: {' and '.join(parts)} {'is' if len(parts) == 1 else 'are'} ignored with --resume; "
            f"the checkpoint {found[-1][1].name} decides the model's size (use --no-resume to start over with new sizes)")


def _train(args, echo) -> int:
    from neuroplastic.neurogen.train import TrainOptions, train

    note = _resume_size_note(args)
    if note:
        echo(note)
    opts = TrainOptions(
        data=args.data, field=args.field, data_dir=args.data_dir, tokenizer=args.tokenizer,
        bpe_vocab_size=args.bpe_vocab_size, tokens_per_chunk=args.tokens_per_chunk, max_chunks=args.max_chunks,
        max_seq_length=args.max_seq_length, checkpoint_interval=args.checkpoint_interval,
        log_interval=args.log_interval, out=args.out, resume=args.resume, init_from=args.init_from, lr=args.lr,
        embedding_dim=512 if args.embedding_dim is None else args.embedding_dim, gpu_device=args.gpu_device,
        scale=1.0 if args.scale is None else args.scale,
        overrides=list(args.overrides), eval_data=args.eval_data, eval_tokens=args.eval_tokens, seed=args.seed,
        tensorboard=args.tensorboard, progress=args.progress,
    )
    s = train(opts, echo=echo)
    print(f"steps {s['steps']} | tokens {s['tokens']:,} | avg loss {s['avg_loss']:.4f} | "
          f"{s['tokens_per_s']:,.0f} tokens/s" + (" | interrupted" if s["interrupted"] else ""))
    st = s["statistics"]
    rates = ", ".join(f"{m} {d['firing_rate']:.4f}" for m, d in st["modules"].items())
    print(f"firing rates: {rates}")
    print(f"dopamine {st['dopamine']:+.3f} (baseline {st['dopamine_baseline']:.3f}) | recall rate "
          f"{st['recall_rate']:.3f} | tagged {st['tagged_fraction']:.4f} | captures {st['captures']} | "
          f"consolidation events {st['consolidation_events']}")
    print(f"run dir: {s['run_dir']}; last checkpoint: {s['checkpoint']}")
    if s["loss_curve"]:
        print(f"loss curve: {s['loss_curve']}")
    # after SIGTERM / Ctrl-C: saved, then 143 / 130, as `neuroplastic train`
    return s["exit_code"]


def _generate(args) -> int:
    from pathlib import Path

    from neuroplastic.data.tokenizers import load_tokenizer
    from neuroplastic.neurogen.train import brain_config, load_model, resolve_checkpoint, run_dir_of

    path = resolve_checkpoint(args.checkpoint)
    if args.max_length < 0:
        raise UserError("--max-length must be >= 0.")
    brain_config(path)  # a foreign checkpoint is reported first
    tok_dir = Path(args.tokenizer) if args.tokenizer else run_dir_of(path) / "tokenizer"
    if not args.tokenizer and not tok_dir.exists() and (path / "tokenizer").is_dir():
        tok_dir = path / "tokenizer"  # a checkpoint directory copied without its run
    if not tok_dir.exists():
        raise UserError(f"no tokenizer at {tok_dir}; pass --tokenizer DIR (the run's tokenizer/ folder).")
    tok = load_tokenizer(tok_dir)
    model, _ = load_model(path, gpu_device=-1)
    if tok.vocab_size != model.vocab_size:
        raise UserError(f"the tokenizer at {tok_dir} has {tok.vocab_size} tokens but the checkpoint {model.vocab_size}.")
    ids = tok.encode(args.prompt) or [tok.eos_id]
    out = model.generate(ids, max_length=args.max_length, temperature=args.temperature, seed=args.seed,
                         eos_token_id=tok.eos_id)
    print(args.prompt + tok.decode(out))
    return 0


def _ablate(args, echo) -> int:
    from neuroplastic.config import parse_override
    from neuroplastic.neurogen.ablate import run_neurogen_ablation

    mechs = [m for spec in args.mechanism for m in spec.split(",") if m]
    if "all" in mechs:
        mechs = list(MECHANISM_NAMES)
    overrides = dict(parse_override(o) for o in args.overrides)
    overrides.setdefault("scale", args.scale)
    res = run_neurogen_ablation(
        mechs, seeds=args.seeds, data=args.data, tokenizer=args.tokenizer, steps=args.steps,
        batch=args.batch_size, seq_len=args.seq_len, embedding_dim=args.embedding_dim, overrides=overrides,
        out_dir=args.out, data_dir=args.data_dir, echo=echo,
    )
    print()
    print(res["markdown"])
    out = res["out_dir"]
    written = [out / "ablation.md", out / "ablation.json", *([res["png"]] if res["png"] else [])]
    print("written: " + ", ".join(str(p) for p in written))
    if res["exit_code"]:
        report = res["report"]
        again = "run the same command again to finish it" if res["exit_code"] != 1 else "see the runs above"
        print(f"neuroplastic: the ablation is incomplete ({len(report.complete_seeds())} of "
              f"{len(report.seeds)} seeds complete); {again}.", file=sys.stderr)
    return res["exit_code"]
