"""``neuroplastic neurogen train``: the seed's ``train_slimpajama.py`` as a command.

Documents stream from any source the project reads (a registry corpus such as
``tinyshakespeare`` or ``slimpajama``, a text/jsonl file or folder, ``hf:NAME`` streamed by
Hugging Face ``datasets``) and are tokenized one at a time (``byte``, a ``bpe`` trained on
the stream's beginning, or GPT-2-style tokenizer files from a local path), joined with the
end-of-text token. Every ``tokens_per_chunk`` tokens make one training step: the chunk is
cut into ``tokens_per_chunk // max_seq_length`` streams of ``max_seq_length`` tokens that
the brain processes in parallel (``NeuroGenModel.train_step``).

The step is :class:`NeuroGenStep`, a step strategy run by the one run shell
(:class:`~neuroplastic.training.run.Run`: run directory and lock, resume, checkpoints,
logger, stop signal, loop). The run directory holds ``tokenizer/``, ``config.yaml``,
``options.json``, ``metrics.jsonl`` (and TensorBoard logs), ``loss_curve.png`` and the
shell's checkpoints ``checkpoints/step_NNNNNNN/`` every ``checkpoint_interval`` steps and at
the end: the brain's tensors (``model.safetensors``), the optimizer's and learning rules'
state (``optimizer.safetensors``), the stream position (document and token), the carried
token, the loss sum, the counters and the RNG states (``state.json``), and the config
(``config.yaml``: the brain's settings and these options). ``--resume`` continues with the
next unseen token, bit for bit as an uninterrupted run. With existing checkpoints and
neither ``--resume`` nor ``--no-resume``, a terminal asks "Load checkpoint? (y/n)";
anything else is told to choose. A run directory of the older single-file format
(``checkpoints/checkpoint_step_N.safetensors`` + ``.json``, which
``NeuroGenModel.save_checkpoint`` still writes) resumes from its newest file and writes the
new format from then on.
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

LEGACY_RE = re.compile(r"^checkpoint_step_(\d+)\.safetensors$")  # NeuroGenModel.save_checkpoint files


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

    def at_end(self) -> bool:
        """Whether every token has been taken (opens the stream to find out)."""
        if self._it is None:
            self._open()
        return self.exhausted

    def state_dict(self) -> dict[str, int]:
        return {"doc": self.doc, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.doc = int(state["doc"])
        self.offset = int(state["offset"])
        self._it = None
        self.exhausted = False


# ------------------------------------------------------------------ checkpoints


FREQUENCY_TOKENS = 1_000_000  # tokens counted to order a new run's adaptive softmax
KEEP_ALL = sys.maxsize  # the run keeps every checkpoint, as before the run shell


def legacy_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint_step_N.safetensors`` files (the single-file format, with their ``.json``), oldest first."""
    from neuroplastic.neurogen.model import metadata_path

    found = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = LEGACY_RE.match(p.name)
            if m and metadata_path(p).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints of both formats as ``(step, path)``, oldest first (at equal steps the
    run shell's ``step_NNNNNNN/`` directory comes last, i.e. counts as the newer)."""
    from neuroplastic.models import checkpoint_io

    shell = [(int(p.name[5:]), p) for p in checkpoint_io.list_checkpoints(ckpt_dir)]
    return sorted(legacy_checkpoints(ckpt_dir) + shell, key=lambda sp: (sp[0], sp[1].is_dir()))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint's path: a ``step_NNNNNNN/`` directory or a single-file checkpoint as
    given, or the newest checkpoint of a run directory."""
    from neuroplastic.models import checkpoint_io

    path = Path(path)
    if not path.exists():
        raise UserError(f"Checkpoint {str(path)!r} does not exist.")
    if path.is_file() or (path / checkpoint_io.STATE_FILE).is_file():
        return path
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not found:
        raise UserError(f"{path} holds no NeuroGen checkpoint (checkpoints/step_NNNNNNN/ or "
                        "checkpoint_step_N.safetensors); give a checkpoint or a run directory.")
    return found[-1][1]


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint lives in (``RUN/checkpoints/CKPT`` -> ``RUN``)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def neurogen_config(config_text: str, path: Path) -> dict[str, Any]:
    """The ``neurogen`` section of a checkpoint's ``config.yaml`` (``brain``, ``options``)."""
    import yaml

    try:
        doc = yaml.safe_load(config_text)
    except yaml.YAMLError:
        doc = None
    section = doc.get("neurogen") if isinstance(doc, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("brain"), dict):
        raise UserError(f"Checkpoint {str(path)!r} is not a NeuroGen checkpoint (its config.yaml has no "
                        "neurogen.brain section); give one written by `neuroplastic neurogen train`.")
    return section


def brain_config(path: Path) -> dict[str, Any]:
    """The brain settings a checkpoint (either format) was trained with."""
    from neuroplastic.neurogen.model import NeuroGenModel

    if path.is_dir():
        text = (path / "config.yaml").read_text(encoding="utf-8") if (path / "config.yaml").is_file() else ""
        return neurogen_config(text, path)["brain"]
    return NeuroGenModel.read_metadata(path).get("config") or {}


def model_from_loaded(loaded: dict[str, Any], gpu_device: int):
    """The :class:`NeuroGenModel` in a run-shell checkpoint read by
    ``checkpoint_io.load_checkpoint``: built with its brain settings, then restored."""
    from neuroplastic.models import checkpoint_io
    from neuroplastic.neurogen.model import NeuroGenModel

    path = loaded["path"]
    conf = dict(neurogen_config(loaded["config_text"], path)["brain"])
    if not isinstance(loaded["state"].get("model"), dict):
        raise UserError(f"Checkpoint {str(path)!r} is inconsistent (its state.json has no model counters).")
    try:
        model = NeuroGenModel(conf.pop("vocab_size"), conf.pop("embedding_dim"), gpu_device, **conf)
    except KeyError as exc:
        raise UserError(f"Checkpoint {str(path)!r} has no {exc} in its config.yaml; it is damaged.") from exc
    tensors = checkpoint_io.load_safetensors(path / "model.safetensors")
    model.restore(tensors, loaded["optimizer"], loaded["state"]["model"], path)
    return model


def load_model(path: str | Path, gpu_device: int):
    """``(model, trainer_state)`` from a checkpoint of either format (:func:`resolve_checkpoint`)."""
    from neuroplastic.models import checkpoint_io
    from neuroplastic.neurogen.model import NeuroGenModel

    path = Path(path)
    if path.is_dir():
        loaded = checkpoint_io.load_checkpoint(path)
        return model_from_loaded(loaded, gpu_device), loaded["state"]
    model = NeuroGenModel.from_checkpoint(path, gpu_device=gpu_device)
    return model, (NeuroGenModel.read_metadata(path).get("extra") or {}).get("trainer") or {}


# ------------------------------------------------------------------ helpers


def _ask_resume(latest: Path, n: int, ask: Callable[[str], str]) -> bool:
    while True:
        answer = ask(f"Found {n} checkpoint(s) in {latest.parent} (latest: {latest.name}). Load checkpoint? (y/n) ")
        a = answer.strip().lower()
        if a in ("y", "yes"):
            return True
        if a in ("n", "no"):
            return False


def build_tokenizer_for(opts: TrainOptions, saved: Path | None, echo: Callable[[str], None]):
    """The run's tokenizer: the one saved at ``saved`` (a resumed run), else built from ``opts``."""
    from neuroplastic.data import sources
    from neuroplastic.data.tokenizers import build_tokenizer, load_tokenizer

    if saved is not None and saved.is_dir():
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


def eval_blocks(opts: TrainOptions, tok) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """``(x, y)`` held-out blocks of ``--eval-data`` (``(None, None)`` without it)."""
    from neuroplastic.data import sources

    if not opts.eval_data:
        return None, None
    ev = TokenStream(lambda: sources.iter_documents(opts.eval_data, field=opts.field, data_dir=opts.data_dir),
                     tok.encode, tok.eos_id).take(opts.eval_tokens + 1)
    L = min(opts.max_seq_length, len(ev) - 1)
    n = (len(ev) - 1) // L if L > 0 else 0
    if n < 1:
        raise UserError(f"--eval-data {opts.eval_data} has fewer than 2 tokens.")
    arr = np.asarray(ev[: n * L + 1], dtype=np.int64)
    return arr[:-1].reshape(n, L), arr[1:].reshape(n, L)


# ------------------------------------------------------------------ the step strategy


class NeuroGenStep:
    """NeuroGen's local-rule training step as a step strategy of the run shell
    (:class:`~neuroplastic.training.run.Run`): one chunk of the token stream per step
    (``NeuroGenModel.train_step``), the held-out loss at every checkpoint interval.
    ``ask``/``isatty`` decide a resume on a terminal (tests pass their own)."""

    progress_desc = "neurogen"

    def __init__(self, opts: TrainOptions, echo: Callable[[str], None] = print,
                 ask: Callable[[str], str] | None = None, isatty: bool | None = None):
        from neuroplastic.training.run import Run, RunSettings

        self.opts = opts.validate()
        self.echo = echo
        self.ask = ask or input
        self.isatty = isatty
        settings = RunSettings(
            out_dir=opts.out, max_steps=opts.max_chunks or math.inf, ckpt_interval=opts.checkpoint_interval,
            keep_last=KEEP_ALL, log_interval=opts.log_interval, progress=opts.progress,
            tensorboard=opts.tensorboard,
        )
        self.run = Run(None, echo, settings=settings, config_text=self.config_text,
                       check=self.check_compatible, names={
            "resume": "--resume", "max_steps": "--max-chunks", "stabilise": "Lower --lr.",
            "resume_path": "--resume after moving the later step_* directories out of checkpoints/",
        })
        self.step = 0
        self.carry: int | None = None
        self.loss_sum = 0.0
        self.tokens = 0
        self.resumed_from: Path | None = None
        self.last_eval: float | None = None
        self.stats: dict[str, Any] = {}

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def finished(self) -> bool:
        """The data has ended (the run shell stops, saves and logs)."""
        return self.stream.at_end()

    # ---- set-up

    def decide_resume(self) -> bool:
        """``opts.resume`` settled (asking on a terminal); False removes the old checkpoints."""
        opts = self.opts
        ckpt_dir = self.run.ckpt_dir
        existing = list_checkpoints(ckpt_dir)
        if existing and opts.resume is None and not opts.init_from:
            tty = sys.stdin.isatty() if self.isatty is None else self.isatty
            if not tty:
                raise UserError(
                    f"{ckpt_dir} already has checkpoints (latest {existing[-1][1].name}); pass --resume to "
                    "continue from it or --no-resume to start over."
                )
            opts.resume = _ask_resume(existing[-1][1], len(existing), self.ask)
        if opts.resume and not existing:
            self.echo(f"no checkpoint in {ckpt_dir}; starting a new run")
            opts.resume = False
        return bool(opts.resume)

    def setup(self) -> NeuroGenStep:
        from neuroplastic.data import sources

        sources.iter_documents(self.opts.data, field=self.opts.field, data_dir=self.opts.data_dir)  # checks the source now
        resume = self.decide_resume()
        self.run.settings.resume = "auto" if resume else "none"
        self.run.setup(lambda: self.build(resume))
        return self

    def start_over(self) -> None:
        """Remove a previous run's checkpoints, tokenizer and TensorBoard logs (``--no-resume``)."""
        run_dir, ckpt_dir = self.run.run_dir, self.run.ckpt_dir
        existing = list_checkpoints(ckpt_dir)
        if existing:
            self.echo(f"starting over: removing {len(existing)} checkpoint(s) in {ckpt_dir}")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(run_dir / "tokenizer", ignore_errors=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)

    def load_resumed(self, gpu: int) -> tuple[Any, dict[str, Any], Path]:
        """``(model, trainer state, tokenizer dir)`` of the checkpoint to resume: the run
        shell's newest, else the newest single-file one."""
        path, loaded = self.run.resume()
        if loaded is not None:
            self.resumed_from = path
            return model_from_loaded(loaded, gpu), loaded["state"], path / "tokenizer"
        step, legacy = legacy_checkpoints(self.run.ckpt_dir)[-1]
        model, state = load_model(legacy, gpu)
        if state.get("data", self.opts.data) != self.opts.data:
            raise UserError(
                f"Cannot resume from {str(legacy)!r}: it was trained on --data {state['data']!r}, not "
                f"{self.opts.data!r}; resume with the data it was trained on, or start a new run with --init-from."
            )
        self.echo(f"{legacy.name} has the single-file format; new checkpoints go to "
                  f"{self.run.ckpt_dir}/step_NNNNNNN/")
        self.resumed_from = legacy
        return model, state, self.run.run_dir / "tokenizer"

    def build(self, resume: bool) -> None:
        import torch

        from neuroplastic.data import sources
        from neuroplastic.runtime import set_rng_state

        opts, run_dir = self.opts, self.run.run_dir
        if not resume:
            self.start_over()
        gpu = opts.gpu_device
        if gpu >= 0 and not torch.cuda.is_available():
            self.echo("CUDA is not available; training on the CPU")
            gpu = -1
        state: dict[str, Any] = {}
        if resume:
            self.model, state, tok_dir = self.load_resumed(gpu)
            self.tokenizer = build_tokenizer_for(opts, tok_dir if tok_dir.is_dir() else run_dir / "tokenizer", self.echo)
            if self.model.vocab_size != self.tokenizer.vocab_size:
                raise UserError(f"The checkpoint's vocabulary ({self.model.vocab_size}) differs from its tokenizer "
                                f"({self.tokenizer.vocab_size}); resume from an earlier checkpoint or start over with --no-resume.")
        else:
            self.tokenizer = build_tokenizer_for(opts, None, self.echo)
            self.model = self.new_model(gpu)
        if opts.overrides and (resume or opts.init_from):
            self.echo("note: --set options apply to new runs only; the checkpoint's brain settings are used")
        if opts.lr is not None:
            self.model.set_lr(opts.lr)
        if not (run_dir / "tokenizer").is_dir():
            self.tokenizer.save(run_dir / "tokenizer")
        self.stream = TokenStream(lambda: sources.iter_documents(opts.data, field=opts.field, data_dir=opts.data_dir),
                                  self.tokenizer.encode, self.tokenizer.eos_id)
        self.restore_position(state)
        if "rng" in state:
            set_rng_state(state["rng"])
        (run_dir / "options.json").write_text(json.dumps(dataclasses.asdict(opts), indent=2), encoding="utf-8")
        self.eval_x, self.eval_y = eval_blocks(opts, self.tokenizer)
        self.L = min(opts.max_seq_length, opts.tokens_per_chunk)
        self.B = max(1, opts.tokens_per_chunk // self.L)
        if resume:
            if opts.max_chunks and self.step > opts.max_chunks:
                raise UserError(
                    f"Checkpoint {str(self.resumed_from)!r} is at step {self.step}, past --max-chunks "
                    f"{opts.max_chunks}; raise --max-chunks above {self.step} to train further."
                )
            self.run.check_resumed(self, self.resumed_from)
        self.logger = self.run.open_logger(self.step if resume else None)

    def new_model(self, gpu: int):
        """A new brain (from ``--init-from``, or built from the options), its adaptive
        softmax ordered by the stream's token frequencies."""
        from neuroplastic.config import parse_override
        from neuroplastic.data import sources
        from neuroplastic.neurogen.model import NeuroGenModel

        opts, tok = self.opts, self.tokenizer
        if opts.init_from:
            model, _ = load_model(resolve_checkpoint(opts.init_from), gpu)
            if model.vocab_size != tok.vocab_size:
                raise UserError(
                    f"{opts.init_from} has vocab_size {model.vocab_size} but the tokenizer {opts.tokenizer!r} has "
                    f"{tok.vocab_size}; use the tokenizer the checkpoint was trained with (--tokenizer)."
                )
            self.echo(f"initialised from {opts.init_from}")
            return model
        extra = dict(parse_override(o) for o in opts.overrides)
        extra.setdefault("seed", opts.seed)
        extra.setdefault("scale", opts.scale)
        model = NeuroGenModel(tok.vocab_size, opts.embedding_dim, gpu, **extra)
        if model.cfg.softmax == "adaptive":
            # the adaptive softmax's head takes the most frequent tokens: count them once, up front
            sample = TokenStream(lambda: sources.iter_documents(opts.data, field=opts.field, data_dir=opts.data_dir),
                                 tok.encode, tok.eos_id).take(FREQUENCY_TOKENS)
            model.set_token_frequencies(np.bincount(np.asarray(sample, dtype=np.int64), minlength=model.vocab_size))
            self.echo(f"adaptive softmax: clusters ordered by the frequencies of the first {len(sample):,} training tokens")
        return model

    def restore_position(self, state: dict[str, Any]) -> None:
        """The stream position, carried token, step and sums of a checkpoint's trainer state."""
        if state.get("stream"):
            self.stream.load_state_dict(state["stream"])
        self.step = int(state.get("step", 0))
        self.loss_sum = float(state.get("loss_sum", 0.0))
        self.tokens = int(state.get("tokens", 0))
        carry = state.get("carry")
        self.carry = None if carry is None else int(carry)

    def check_compatible(self, loaded: dict[str, Any], path: Path) -> None:
        """The run shell's check before resuming: the stream position counts documents of
        the checkpoint's ``--data`` (and ``--field``), so they must be the same now."""
        saved = neurogen_config(loaded["config_text"], path).get("options") or {}
        for key in ("data", "field"):
            then, now = saved.get(key), getattr(self.opts, key)
            if then != now:
                raise UserError(
                    f"Cannot resume from {str(path)!r}: it was trained with --{key} {then!r}, not {now!r}; "
                    "resume with the settings it was trained with, or start a new run with --init-from."
                )

    def config_text(self) -> str:
        """``config.yaml``: the brain's settings and the options of this run."""
        import yaml

        options = dataclasses.asdict(self.opts)
        return yaml.safe_dump({"neurogen": {"brain": self.model.cfg.to_dict(), "options": options}}, sort_keys=False)

    def describe(self) -> str:
        tok = self.tokenizer
        return (f"{self.model!r}; {self.B} streams x {self.L} tokens per step; data: {self.opts.data}; "
                f"tokenizer: {tok.kind} (vocab {tok.vocab_size})")

    # ---- the run shell's hooks

    def train_step(self) -> dict[str, Any]:
        """One chunk: ``B`` streams of ``L`` tokens (at the end of the data, whole streams of
        ``L`` tokens or one shorter stream)."""
        B, L = self.B, self.L
        # consecutive chunks overlap by one token: the last target is the next input
        chunk = ([self.carry] if self.carry is not None else []) + self.stream.take(B * L + (self.carry is None))
        if len(chunk) < 2:
            raise UserError(f"--data {self.opts.data} holds fewer than 2 tokens; give more text.")
        if len(chunk) < B * L + 1:
            b, ln = ((len(chunk) - 1) // L, L) if len(chunk) > L else (1, len(chunk) - 1)
        else:
            b, ln = B, L
        arr = np.asarray(chunk[: b * ln + 1], dtype=np.int64)
        self.carry = int(arr[-1])
        x, y = arr[:-1].reshape(b, ln), arr[1:].reshape(b, ln)
        loss = self.model.train_step(x, y)
        self.step += 1
        self.tokens += x.size
        self.loss_sum += loss
        return {"loss": loss, "tokens": int(x.size)}

    def state(self) -> dict[str, Any]:
        from neuroplastic.runtime import rng_state

        return {"step": self.step, "stream": self.stream.state_dict(), "carry": self.carry,
                "loss_sum": self.loss_sum, "tokens": self.tokens, "model": self.model.counters_state(),
                "rng": rng_state()}

    def state_finite(self) -> bool:
        import torch

        opt_state = self.model.optimizer.state.values()
        tensors = list(self.model.brain.state_dict().values())
        tensors += [v for st in opt_state for v in st.values() if isinstance(v, torch.Tensor)]
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())

    def checkpoint_payload(self):
        return self.model.brain, self.model.learning_state()

    def log_extras(self, tokens_per_s: float) -> dict[str, Any]:
        self.stats = self.model.get_statistics()
        extras: dict[str, Any] = {"avg_loss": self.loss_sum / self.step, "tokens_seen": self.tokens}
        extras.update({k: v for k, v in flat_stats(self.stats).items()
                       if k not in ("loss", "step", "tokens_processed")})
        return extras

    def postfix(self, record: dict[str, Any]) -> dict[str, Any]:
        st = self.stats
        return {"loss": f"{record['loss']:.3f}", "avg": f"{self.loss_sum / self.step:.3f}",
                "tok_s": f"{record['tokens_per_s']:,.0f}", "dopa": f"{st['dopamine']:+.2f}",
                "fr_pfc": f"{st['modules']['pfc']['firing_rate']:.4f}", "recall": f"{st['recall_rate']:.2f}",
                "consol": st["consolidation_events"]}

    def after_step(self) -> None:
        """The held-out loss at every checkpoint interval and at the end."""
        if self.eval_x is None:
            return
        at_end = self.step == self.run.settings.max_steps or self.finished
        if self.step % self.opts.checkpoint_interval and not at_end:
            return
        x, y = self.eval_x, self.eval_y
        self.last_eval = float(np.mean([self.model.evaluate(x[i : i + 16], y[i : i + 16])
                                        for i in range(0, len(x), 16)]))
        self.logger.log("eval", self.step, loss=self.last_eval)

    # ---- the run

    def train(self) -> dict[str, Any]:
        """Step until ``--max-chunks`` or the end of the data; the summary :func:`train` returns."""
        from neuroplastic.training.metrics import plot_loss_curve

        t0 = time.perf_counter()
        tokens_at_start = self.tokens
        with self.run.session():
            self.model.brain.train()
            summary = self.run.loop(self, self.run.settings.max_steps)
            self.logger.close()
        run_dir = self.run.run_dir
        png = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", title=f"neurogen: {self.opts.data}")
        elapsed = time.perf_counter() - t0
        found = list_checkpoints(self.run.ckpt_dir)
        return {
            "steps": self.step, "tokens": self.tokens, "avg_loss": self.loss_sum / self.step if self.step else math.nan,
            "tokens_per_s": (self.tokens - tokens_at_start) / max(elapsed, 1e-9),
            "checkpoint": found[-1][1] if found else None, "run_dir": run_dir, "loss_curve": png,
            "interrupted": summary["interrupted"], "exit_code": summary["exit_code"],
            "resumed_from": self.resumed_from, "last_eval": self.last_eval,
            "statistics": self.model.get_statistics(),
        }


def train(opts: TrainOptions, echo: Callable[[str], None] = print,
          ask: Callable[[str], str] | None = None, isatty: bool | None = None) -> dict[str, Any]:
    """Run the streaming trainer in the run shell; returns a summary (with ``exit_code``:
    130/143 after Ctrl-C/SIGTERM, which save first). ``ask``/``isatty`` are for tests."""
    step = NeuroGenStep(opts, echo=echo, ask=ask, isatty=isatty).setup()
    echo(step.describe())
    if step.resumed_from is not None:
        echo(f"resuming from {step.resumed_from} (step {step.step})")
        if opts.max_chunks and step.step >= opts.max_chunks:
            echo(f"Nothing to train: {step.resumed_from} is already at --max-chunks {opts.max_chunks}; "
                 "raise --max-chunks to train further.")
    return step.train()
