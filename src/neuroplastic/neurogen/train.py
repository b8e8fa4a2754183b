"""``neuroplastic neurogen train``: the seed's ``train_slimpajama.py`` as a command.

Documents stream from any source the project reads (a registry corpus such as
``tinyshakespeare`` or ``slimpajama``, a text/jsonl file or folder, ``hf:NAME`` streamed by
Hugging Face ``datasets``) and are tokenized one at a time (``byte``, a ``bpe`` trained on
the stream's beginning, or GPT-2-style tokenizer files from a local path), joined with the
end-of-text token. Every ``tokens_per_chunk`` tokens make one training step: the chunk is
cut into ``tokens_per_chunk // max_seq_length`` streams of ``max_seq_length`` tokens that
the brain processes in parallel (``NeuroGenModel.train_step``).

The run directory holds ``tokenizer/``, ``metrics.jsonl`` (and TensorBoard logs),
``checkpoints/checkpoint_step_N.safetensors`` (+ ``.json``) every ``checkpoint_interval``
steps and at the end, and ``loss_curve.png``. The checkpoint also stores the stream position
(document and token), so ``--resume`` continues with the next unseen token. With existing
checkpoints and neither ``--resume`` nor ``--no-resume``, a terminal asks
"Load checkpoint? (y/n)"; anything else is told to choose.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroplastic.errors import UserError

CKPT_RE = re.compile(r"^checkpoint_step_(\d+)\.safetensors$")


@dataclass
class TrainOptions:
    data: str = "tinyshakespeare"
    field: str = "text"
    data_dir: str | None = None
    tokenizer: str = "byte"  # byte | bpe | path to GPT-2 files / tokenizer.json / a saved tokenizer
    bpe_vocab_size: int = 4096
    bpe_train_chars: int = 2_000_000
    tokens_per_chunk: int = 4096
    max_chunks: int = 0  # 0: until the data ends
    max_seq_length: int = 256
    checkpoint_interval: int = 100
    log_interval: int = 10
    out: str = "runs/neurogen"
    resume: bool | None = None  # None: ask on a terminal
    init_from: str | None = None
    lr: float | None = None
    embedding_dim: int = 512
    gpu_device: int = 0
    scale: float = 1.0
    overrides: list[str] = dataclasses.field(default_factory=list)  # brain config key=value
    eval_data: str | None = None
    eval_tokens: int = 16384
    seed: int = 0
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> TrainOptions:
        for key in ("tokens_per_chunk", "max_seq_length", "checkpoint_interval", "log_interval",
                    "bpe_vocab_size", "eval_tokens", "embedding_dim"):
            v = getattr(self, key)
            if v < 1:
                raise UserError(f"--{key.replace('_', '-')} must be a positive integer, got {v}.")
        if self.max_chunks < 0:
            raise UserError(f"--max-chunks must be >= 0 (0: until the data ends), got {self.max_chunks}.")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"--lr must be > 0, got {self.lr}.")
        if self.init_from and self.resume:
            raise UserError("--init-from starts a new run from a checkpoint; it cannot be combined with --resume.")
        return self


# ------------------------------------------------------------------ the token stream


class TokenStream:
    """Tokens of a document stream, one document at a time, with a resumable position."""

    def __init__(self, docs: Callable[[], Iterator[str]], encode: Callable[[str], list[int]], eos_id: int):
        self._docs_factory = docs
        self.encode = encode
        self.eos_id = eos_id
        self.doc = 0  # index of the document being read
        self.offset = 0  # next token inside it
        self._it: Iterator[str] | None = None
        self._tokens: list[int] | None = None
        self.exhausted = False

    def _open(self) -> None:
        self._it = self._docs_factory()
        for _ in range(self.doc):  # skip what an earlier run consumed
            if next(self._it, None) is None:
                self.exhausted = True
                return
        self._load()

    def _load(self) -> None:
        text = next(self._it, None)
        if text is None:
            self._tokens = None
            self.exhausted = True
        else:
            self._tokens = list(self.encode(text)) + [self.eos_id]

    def take(self, n: int) -> list[int]:
        """Up to ``n`` next tokens (fewer only at the end of the data)."""
        if self._it is None:
            self._open()
        out: list[int] = []
        while len(out) < n and not self.exhausted:
            toks = self._tokens
            need = n - len(out)
            part = toks[self.offset : self.offset + need]
            out.extend(part)
            self.offset += len(part)
            if self.offset >= len(toks):
                self.doc += 1
                self.offset = 0
                self._load()
        return out

    def state_dict(self) -> dict[str, int]:
        return {"doc": self.doc, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.doc = int(state["doc"])
        self.offset = int(state["offset"])
        self._it = None
        self.exhausted = False


# ------------------------------------------------------------------ helpers


FREQUENCY_TOKENS = 1_000_000  # tokens counted to order a new run's adaptive softmax


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    from neuroplastic.neurogen.model import metadata_path

    found = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = CKPT_RE.match(p.name)
            if m and metadata_path(p).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _ask_resume(latest: Path, n: int, ask: Callable[[str], str]) -> bool:
    while True:
        answer = ask(f"Found {n} checkpoint(s) in {latest.parent} (latest: {latest.name}). Load checkpoint? (y/n) ")
        a = answer.strip().lower()
        if a in ("y", "yes"):
            return True
        if a in ("n", "no"):
            return False


def build_tokenizer_for(opts: TrainOptions, run_dir: Path, echo: Callable[[str], None]):
    from neuroplastic.data import sources
    from neuroplastic.data.tokenizers import build_tokenizer, load_tokenizer

    saved = run_dir / "tokenizer"
    if opts.resume and saved.is_dir():
        return load_tokenizer(saved)
    if opts.tokenizer == "bpe":
        def texts() -> Iterator[str]:
            total = 0
            for doc in sources.iter_documents(opts.data, field=opts.field, data_dir=opts.data_dir):
                yield doc[: opts.bpe_train_chars - total]
                total += len(doc)
                if total >= opts.bpe_train_chars:
                    return

        echo(f"training a BPE tokenizer (vocab {opts.bpe_vocab_size}) on the first {opts.bpe_train_chars:,} characters")
        return build_tokenizer("bpe", texts, vocab_size=opts.bpe_vocab_size)
    return build_tokenizer(opts.tokenizer, None)


def flat_stats(stats: dict[str, Any]) -> dict[str, float]:
    """The numeric statistics as one flat mapping (``firing_rate/pfc``, ``dopamine``, ...)."""
    out: dict[str, float] = {}
    for k, v in stats.items():
        if k == "modules":
            for m, d in v.items():
                out[f"firing_rate/{m}"] = d["firing_rate"]
                out[f"mean_weight/{m}"] = d["mean_weight"]
        elif isinstance(v, bool):
            continue
        elif isinstance(v, int | float):
            out[k] = float(v)
    return out


# ------------------------------------------------------------------ the run


def train(opts: TrainOptions, echo: Callable[[str], None] = print,
          ask: Callable[[str], str] | None = None, isatty: bool | None = None) -> dict[str, Any]:
    """Run the streaming trainer; returns a summary. ``ask``/``isatty`` are for tests."""
    import torch

    from neuroplastic.data import sources
    from neuroplastic.neurogen.model import NeuroGenModel
    from neuroplastic.training.metrics import MetricsLogger, plot_loss_curve
    from neuroplastic.training.run import StopRequest

    opts.validate()
    run_dir = Path(opts.out)
    ckpt_dir = run_dir / "checkpoints"
    existing = list_checkpoints(ckpt_dir)
    if existing and opts.resume is None and not opts.init_from:
        tty = sys.stdin.isatty() if isatty is None else isatty
        if not tty:
            raise UserError(
                f"{ckpt_dir} already has checkpoints (latest {existing[-1][1].name}); pass --resume to "
                "continue from it or --no-resume to start over."
            )
        opts.resume = _ask_resume(existing[-1][1], len(existing), ask or input)
    if opts.resume and not existing:
        echo(f"no checkpoint in {ckpt_dir}; starting a new run")
        opts.resume = False
    if not opts.resume:
        if existing:
            echo(f"starting over: removing {len(existing)} checkpoint(s) in {ckpt_dir}")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(run_dir / "tokenizer", ignore_errors=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    gpu = opts.gpu_device
    if gpu >= 0 and not torch.cuda.is_available():
        echo("CUDA is not available; training on the CPU")
        gpu = -1

    # ---- data, tokenizer, model
    sources.iter_documents(opts.data, field=opts.field, data_dir=opts.data_dir)  # checks the source now
    tok = build_tokenizer_for(opts, run_dir, echo)
    trainer_state: dict[str, Any] = {}
    resumed_from = None
    if opts.resume:
        step_n, path = existing[-1]
        model = NeuroGenModel.from_checkpoint(path, gpu_device=gpu)
        trainer_state = (NeuroGenModel.read_metadata(path).get("extra") or {}).get("trainer") or {}
        resumed_from = path
        if model.vocab_size != tok.vocab_size:
            raise UserError(f"The checkpoint's vocabulary ({model.vocab_size}) differs from the tokenizer in {run_dir / 'tokenizer'} ({tok.vocab_size}).")
    elif opts.init_from:
        model = NeuroGenModel.from_checkpoint(opts.init_from, gpu_device=gpu)
        if model.vocab_size != tok.vocab_size:
            raise UserError(
                f"{opts.init_from} has vocab_size {model.vocab_size} but the tokenizer {opts.tokenizer!r} has "
                f"{tok.vocab_size}; use the tokenizer the checkpoint was trained with (--tokenizer)."
            )
        echo(f"initialised from {opts.init_from}")
    else:
        from neuroplastic.config import parse_override

        extra = dict(parse_override(o) for o in opts.overrides)
        extra.setdefault("seed", opts.seed)
        extra.setdefault("scale", opts.scale)
        model = NeuroGenModel(tok.vocab_size, opts.embedding_dim, gpu, **extra)
    if opts.overrides and (opts.resume or opts.init_from):
        echo("note: --set options apply to new runs only; the checkpoint's brain settings are used")
    if opts.lr is not None:
        model.set_lr(opts.lr)
    if not (run_dir / "tokenizer").is_dir():
        tok.save(run_dir / "tokenizer")
    if model.cfg.softmax == "adaptive" and not (opts.resume or opts.init_from):
        # the adaptive softmax's head takes the most frequent tokens: count them once, up front
        sample = TokenStream(lambda: sources.iter_documents(opts.data, field=opts.field, data_dir=opts.data_dir),
                             tok.encode, tok.eos_id).take(FREQUENCY_TOKENS)
        model.set_token_frequencies(np.bincount(np.asarray(sample, dtype=np.int64), minlength=model.vocab_size))
        echo(f"adaptive softmax: clusters ordered by the frequencies of the first {len(sample):,} training tokens")

    stream = TokenStream(
        lambda: sources.iter_documents(opts.data, field=opts.field, data_dir=opts.data_dir), tok.encode, tok.eos_id
    )
    if trainer_state.get("stream"):
        stream.load_state_dict(trainer_state["stream"])
    step = int(trainer_state.get("step", 0))
    loss_sum = float(trainer_state.get("loss_sum", 0.0))
    tokens = int(trainer_state.get("tokens", 0))
    carry = trainer_state.get("carry")
    (run_dir / "options.json").write_text(json.dumps(dataclasses.asdict(opts), indent=2), encoding="utf-8")

    eval_x = eval_y = None
    if opts.eval_data:
        ev = TokenStream(lambda: sources.iter_documents(opts.eval_data, field=opts.field, data_dir=opts.data_dir),
                         tok.encode, tok.eos_id).take(opts.eval_tokens + 1)
        L = min(opts.max_seq_length, len(ev) - 1)
        n = (len(ev) - 1) // L
        if n < 1:
            raise UserError(f"--eval-data {opts.eval_data} has fewer than 2 tokens.")
        arr = np.asarray(ev[: n * L + 1], dtype=np.int64)
        eval_x, eval_y = arr[:-1].reshape(n, L), arr[1:].reshape(n, L)

    L = min(opts.max_seq_length, opts.tokens_per_chunk)
    B = max(1, opts.tokens_per_chunk // L)
    logger = MetricsLogger(run_dir, tensorboard=opts.tensorboard, resume_step=step if opts.resume else None)
    echo(f"{model!r}; {B} streams x {L} tokens per step; data: {opts.data}; tokenizer: {tok.kind} (vocab {tok.vocab_size})")
    if resumed_from is not None:
        echo(f"resuming from {resumed_from} (step {step})")

    def save() -> Path:
        path = ckpt_dir / f"checkpoint_step_{step}.safetensors"
        model.save_checkpoint(path, extra={"trainer": {
            "step": step, "stream": stream.state_dict(), "carry": carry, "loss_sum": loss_sum, "tokens": tokens,
            "data": opts.data, "tokenizer": str(run_dir / "tokenizer")}})
        return path

    def evaluate() -> float | None:
        if eval_x is None:
            return None
        loss = float(np.mean([model.evaluate(eval_x[i : i + 16], eval_y[i : i + 16]) for i in range(0, len(eval_x), 16)]))
        logger.log("eval", step, loss=loss)
        return loss

    bar = None
    if opts.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=opts.max_chunks or None, initial=step, desc="neurogen", unit="step", dynamic_ncols=True,
                   file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 15.0)
    last_ckpt = None
    t_window, n_window = time.perf_counter(), 0
    t0 = time.perf_counter()
    tokens_at_start = tokens
    interrupted = False
    try:
        with StopRequest() as stop:
            while not opts.max_chunks or step < opts.max_chunks:
                # consecutive chunks overlap by one token: the last target is the next input
                chunk = ([carry] if carry is not None else []) + stream.take(B * L + (carry is None))
                if len(chunk) < 2:
                    break
                last = len(chunk) < B * L + 1
                if last:  # the end of the data: whole streams of L tokens, or one shorter stream
                    b, ln = ((len(chunk) - 1) // L, L) if len(chunk) > L else (1, len(chunk) - 1)
                else:
                    b, ln = B, L
                arr = np.asarray(chunk[: b * ln + 1], dtype=np.int64)
                carry = int(arr[-1])
                x, y = arr[:-1].reshape(b, ln), arr[1:].reshape(b, ln)
                loss = model.train_step(x, y)
                step += 1
                tokens += x.size
                loss_sum += loss
                n_window += x.size
                if bar is not None:
                    bar.update(1)
                if step % opts.log_interval == 0:
                    now = time.perf_counter()
                    tps = n_window / max(now - t_window, 1e-9)
                    t_window, n_window = now, 0
                    st = model.get_statistics()
                    rec = {"loss": loss, "avg_loss": loss_sum / step, "tokens_per_s": tps, "tokens": tokens}
                    rec.update({k: v for k, v in flat_stats(st).items() if k not in ("loss", "step", "tokens_processed")})
                    logger.log("train", step, **rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.3f}", avg=f"{loss_sum / step:.3f}", tok_s=f"{tps:,.0f}",
                                        dopa=f"{st['dopamine']:+.2f}", fr_pfc=f"{st['modules']['pfc']['firing_rate']:.4f}",
                                        recall=f"{st['recall_rate']:.2f}", consol=st["consolidation_events"])
                if step % opts.checkpoint_interval == 0:
                    last_ckpt = save()
                    evaluate()
                if stop.requested:
                    interrupted = True
                    break
                if last:
                    break
    finally:
        if bar is not None:
            bar.close()
    if step and (last_ckpt is None or not last_ckpt.name.endswith(f"_{step}.safetensors")):
        last_ckpt = save()
        evaluate()
    logger.close()
    png = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", title=f"neurogen: {opts.data}")
    elapsed = time.perf_counter() - t0
    return {
        "steps": step, "tokens": tokens, "avg_loss": loss_sum / step if step else math.nan,
        "tokens_per_s": (tokens - tokens_at_start) / max(elapsed, 1e-9), "checkpoint": last_ckpt,
        "run_dir": run_dir, "loss_curve": png, "interrupted": interrupted, "resumed_from": resumed_from,
        "statistics": model.get_statistics(),
    }
