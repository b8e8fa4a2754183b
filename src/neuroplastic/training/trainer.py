"""The one trainer.

Recipes configure it; plasticity rules plug in as callbacks with the hook points of
the design map (``penalty`` -> ``after_backward`` -> optimizer step -> ``after_step``).
Everything stateful is checkpointed, so ``train.resume=auto`` continues a run exactly:
the losses of an interrupted-and-resumed run equal those of an uninterrupted one bit
for bit on CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from neuroplastic.config import RunConfig, config_from_dict, dump_config
from neuroplastic.data.batching import PackedBlocks, sequential_blocks
from neuroplastic.errors import UserError
from neuroplastic.evaluation.lm import lm_metrics
from neuroplastic.runtime import (
    amp_dtype,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from neuroplastic.training import checkpoint as ckpt
from neuroplastic.training.callbacks import Callback
from neuroplastic.training.distributed import (
    Distributed,
    NullLogger,
    rank_device,
    set_grad_sync,
    setup_distributed,
)
from neuroplastic.training.metrics import MetricsLogger, plot_loss_curve
from neuroplastic.training.optim import build_optimizer, lr_at

# ------------------------------------------------------------------------ helpers


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"Cannot write to output directory {str(directory)!r} ({exc.strerror or exc}); "
            "choose another with train.out_dir=PATH."
        ) from exc


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _first_difference(va, vb, f"{prefix}{k}.")
            if d:
                return d
        elif va != vb:
            return f"{prefix}{k} ({va!r} in the checkpoint, {vb!r} now)"
    return None


class StopRequest:
    """SIGINT/SIGTERM -> finish the current step, save a checkpoint, stop.

    A second Ctrl-C interrupts immediately. ``signum`` is the first signal received;
    :meth:`exit_code` is what the command line exits with after saving (128 + signal:
    130 for Ctrl-C, 143 for SIGTERM), so that ``train && evaluate`` and schedulers see
    the interruption.
    """

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.signum is None:
            self.signum = signum

    @staticmethod
    def exit_code(signum: int | None) -> int:
        """128 + the signal (SIGTERM when a peer process asked to stop)."""
        return 128 + int(signum if signum is not None else signal.SIGTERM)

    def __enter__(self):
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False




def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------ trainer


class Trainer:
    """Train a model from a :class:`RunConfig`; see the module docstring."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        callbacks: Sequence[Callback] = (),
        echo: Callable[[str], None] | None = None,
        model_factory: Callable[[Any], torch.nn.Module] | None = None,
    ):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.echo = echo or (lambda s: None)
        self.model_factory = model_factory
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.best_val = float("inf")
        self.best_step = -1
        self.last_eval: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []  # per-step train records (kept in memory)
        self.dist = Distributed()  # data-parallel group (torchrun); one process by default
        self._stop = None
        self._stop_agreed = False
        self._last_saved_step = -1
        self._peak = None
        self._setup_done = False
        self._lock: ckpt.RunLock | None = None
        self._finite_step = 0  # the last step after which the state was checked finite

    # ------------------------------------------------------------------ setup

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.out_dir.format(name=self.cfg.name))

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _resume_path(self) -> Path | None:
        spec = self.cfg.train.resume
        if spec in ("", "none"):
            existing = ckpt.list_checkpoints(self.ckpt_dir)
            if existing:
                raise UserError(
                    f"Run directory {str(self.run_dir)!r} already holds checkpoints; continue it "
                    "with train.resume=auto (or --resume), or pick another train.out_dir."
                )
            return None
        if spec == "auto":
            return ckpt.latest_checkpoint(self.ckpt_dir)
        path = Path(spec)
        if not path.exists():
            raise UserError(f"Checkpoint {spec!r} given in train.resume does not exist.")
        return path

    def _acquire_lock(self) -> None:
        """One writer per run directory (rank 0 writes; the other ranks of a group do not lock)."""
        from neuroplastic.training.distributed import env_rank

        if env_rank() != 0:
            return
        if self._lock is None:
            self._lock = ckpt.RunLock(self.run_dir)
        self._lock.acquire()

    def close(self) -> None:
        """Release the run directory's lock (``train`` does this when it returns)."""
        if self._lock is not None:
            self._lock.release()

    def _last_good(self) -> str:
        """A sentence naming the last checkpoint on disk (every one we write is finite)."""
        latest = ckpt.latest_checkpoint(self.ckpt_dir)
        if latest is None:
            return "No checkpoint had been written yet, so there is none to resume from."
        return (
            f"The last good checkpoint is untouched: {latest} (step {int(latest.name[5:])}); "
            "resume from it with train.resume=auto."
        )

    def _state_finite(self) -> bool:
        """Parameters and optimizer state all finite (on every rank: FSDP shards differ)."""
        ok = ckpt.state_is_finite(self.model, self.optimizer)
        if self.dist.enabled and self.dist.fsdp:
            ok = self.dist.mean([0.0 if ok else 1.0], self.device)[0] == 0.0
        return ok

    def setup(self) -> Trainer:
        if self._setup_done:
            return self
        check_writable(self.run_dir)
        self._acquire_lock()
        try:
            from neuroplastic.training.distributed import env_rank

            check_writable(self.ckpt_dir)
            if env_rank() == 0:
                for line in ckpt.clean_stale(self.ckpt_dir):
                    self.echo(f"checkpoints: {line}")
            return self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> Trainer:
        cfg = self.cfg
        resume_path = self._resume_path()
        loaded = ckpt.load_checkpoint(resume_path) if resume_path is not None else None
        if loaded is not None:
            import yaml

            saved_cfg = config_from_dict(yaml.safe_load(loaded["config_text"]))
            now_model = cfg.to_dict()["model"]
            if now_model["vocab_size"] == 0:  # 0 = "from the tokenizer", which the checkpoint fixed
                now_model["vocab_size"] = saved_cfg.model.vocab_size
            diff = _first_difference({"model": saved_cfg.to_dict()["model"]}, {"model": now_model})
            if diff is None:
                saved_data = saved_cfg.to_dict()["data"]
                now_data = cfg.to_dict()["data"]
                saved_data.pop("data_dir", None)
                now_data.pop("data_dir", None)
                diff = _first_difference({"data": saved_data}, {"data": now_data})
            if diff is None:
                diff = _first_difference(
                    {"curriculum": saved_cfg.to_dict()["curriculum"]},
                    {"curriculum": cfg.to_dict()["curriculum"]},
                )
            if diff is not None:
                raise UserError(
                    f"Cannot resume from {str(resume_path)!r}: config differs at {diff}; "
                    "resume with the settings the checkpoint was trained with."
                )

        self.device = resolve_device(cfg.train.device, option="train.device")
        self.dist = setup_distributed(cfg.train.parallel, self.device)
        self.device = rank_device(self.device, self.dist)
        if not self.dist.is_main:
            self.echo = lambda s: None
        self.amp = amp_dtype(cfg.train.amp, self.device)
        seed_everything(cfg.train.seed)

        from neuroplastic.data.pipeline import prepare_data, prepare_stages, token_byte_lengths

        tok_dir = (resume_path / "tokenizer") if loaded is not None else None
        if tok_dir is not None and not tok_dir.is_dir():
            raise UserError(f"Checkpoint {str(resume_path)!r} has no tokenizer/; it is incomplete.")
        if tok_dir is None and cfg.model.arch == "hf" and cfg.data.tokenizer == cfg.model.hf_path:
            # model=NAME: the model's own tokenizer, from the directory NAME resolves to
            from neuroplastic.models.hf import local_model_dir

            tok_dir = local_model_dir(cfg.model.hf_path, cfg.model.allow_hub)
        self.curriculum = None
        if cfg.curriculum.stages:
            staged = prepare_stages(cfg.data, cfg.curriculum.stages, tokenizer_dir=tok_dir)
            self.tokenizer = staged.tokenizer
            self.data = staged
        else:
            self.data = prepare_data(cfg.data, tokenizer_dir=tok_dir)
            self.tokenizer = self.data.tokenizer
        self.byte_lengths = torch.from_numpy(token_byte_lengths(self.tokenizer))

        if cfg.model.arch == "hf":
            pass  # the pretrained model brings its own vocabulary
        elif cfg.model.vocab_size == 0:
            cfg.model.vocab_size = self.tokenizer.vocab_size
        elif cfg.model.vocab_size < self.tokenizer.vocab_size:
            raise UserError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                f"vocabulary ({self.tokenizer.vocab_size}); set model.vocab_size=0 to match it."
            )
        self.block_size = cfg.block_size
        tc = cfg.train
        if cfg.curriculum.stages:
            from neuroplastic.curriculum import Curriculum, CurriculumStream

            cc = cfg.curriculum
            self.curriculum = Curriculum(
                cc.stages, tc.max_steps, cc.advance, cc.boundaries, cc.patience, cc.min_delta
            )
            self.train_data = CurriculumStream(
                self.data.train, self.curriculum, self.block_size,
                tc.batch_size * self.dist.world_size, seed=tc.seed, cumulative=cc.cumulative,
            )
            self.val_sets = {
                name: sequential_blocks(v, self.block_size, tc.batch_size, tc.eval_batches)
                for name, v in self.data.val.items()
            }
        else:
            self.train_data = PackedBlocks(
                self.data.train_tokens, self.block_size, tc.batch_size * self.dist.world_size,
                seed=tc.seed,
            )
            self.val_sets = {
                "val": sequential_blocks(
                    self.data.val_tokens, self.block_size, tc.batch_size, tc.eval_batches
                )
            }
        # every rank draws the same global batch and keeps its own rows
        self.train_data = self.dist.shard_batches(self.train_data)

        if self.model_factory is not None:
            model = self.model_factory(cfg.model)
        else:
            from neuroplastic.models import build_model

            model = build_model(cfg.model)
        self.model = model.to(self.device)
        if cfg.plasticity.rules and self.dist.enabled and self.dist.fsdp:
            raise UserError(
                "Plasticity rules are not supported with train.parallel=fsdp yet; use "
                "train.parallel=ddp (or drop plasticity.rules)."
            )
        wrapped = self.dist.wrap(self.model, self.device)  # DDP, or FSDP2 in place
        self.forward_model = torch.compile(wrapped) if cfg.train.compile else wrapped
        self.optimizer = build_optimizer(self.model, cfg.train, self.device)
        self.scaler = (
            torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        )
        self.engine = None
        if cfg.plasticity.rules:
            from neuroplastic.plasticity import PlasticityEngine
            from neuroplastic.plasticity.registry import build_rule
            from neuroplastic.training.plastic import EngineCallback

            self.engine = PlasticityEngine(
                self.model,
                [build_rule(r) for r in cfg.plasticity.rules],
                optimizer=self.optimizer,
                baseline_decay=cfg.plasticity.baseline_decay,
                normalize_advantage=cfg.plasticity.normalize_advantage,
            )
            self.callbacks.append(EngineCallback(self.engine))
        if cfg.recipe_module:
            import importlib

            try:
                module = importlib.import_module(f"neuroplastic.recipes.{cfg.recipe_module}")
            except ModuleNotFoundError as exc:
                raise UserError(
                    f"recipe_module {cfg.recipe_module!r} does not exist in neuroplastic.recipes."
                ) from exc
            # recipe callbacks run first: they may set trainer.reward for the engine
            self.callbacks[:0] = list(module.callbacks(self))
        elif cfg.options:
            raise UserError("options are given but no recipe_module uses them; drop them or set recipe_module.")
        if cfg.reward.interval > 0:
            from neuroplastic.training.reward import RewardCallback

            # the reward must be computed before the engine applies it: run first
            self.callbacks.insert(0, RewardCallback(cfg.reward))
        self.reward: float | None = None  # set by a reward callback for the current step

        if loaded is not None:
            self._restore(loaded)
            self._finite_step = self.step
            if not self._state_finite():
                raise UserError(
                    f"Checkpoint {str(resume_path)!r} holds non-finite parameters or optimizer "
                    "state; resume from an earlier checkpoint with train.resume=PATH."
                )
            if self.step > tc.max_steps:
                raise UserError(
                    f"Checkpoint {str(resume_path)!r} is at step {self.step}, past "
                    f"train.max_steps={tc.max_steps}; raise train.max_steps above {self.step} "
                    "to train further (or evaluate the checkpoint as it is)."
                )
        self._apply_stage_alpha()
        if self.dist.is_main:
            self.logger = MetricsLogger(
                self.run_dir, tensorboard=cfg.train.tensorboard,
                resume_step=self.step if loaded is not None else None,
            )
            (self.run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        else:  # only rank 0 logs
            self.logger = NullLogger(self.run_dir)
        if self.dist.enabled:
            self.echo(
                f"data parallel: {self.dist.world_size} processes ({self.dist.strategy}, "
                f"{self.dist.backend}), global batch {tc.batch_size * self.dist.world_size}"
            )
        self.resumed_from = resume_path
        self._setup_done = True
        return self

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_streak": self.nonfinite_streak,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "data": self.train_data.state_dict(),
            "rng": rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
        }

    def _restore(self, loaded: dict[str, Any]) -> None:
        path = loaded["path"]
        self.dist.load_model(self.model, path / "model.safetensors")
        try:
            self.dist.load_optimizer(self.model, self.optimizer, loaded["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(
                f"The optimizer state in {str(path)!r} does not fit this model ({exc})."
            ) from exc
        s = loaded["state"]
        self.step = int(s["step"])
        self.tokens_seen = int(s["tokens_seen"])
        self.nonfinite_total = int(s["nonfinite_total"])
        self.nonfinite_streak = int(s["nonfinite_streak"])
        self.best_val = float(s["best_val"])
        self.best_step = int(s["best_step"])
        self.train_data.load_state_dict(s["data"])
        if self.scaler is not None and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        saved_cbs = s.get("callbacks", {})
        current = {cb.name for cb in self.callbacks}
        for name, st in saved_cbs.items():
            if st and name not in current:
                raise UserError(
                    f"The checkpoint {str(path)!r} holds {name!r} state (e.g. plasticity rules) that "
                    "this run does not have; resume with the settings it was started with."
                )
        for cb in self.callbacks:
            if cb.name in saved_cbs:
                cb.load_state_dict(saved_cbs[cb.name])
            elif cb.state_dict():
                raise UserError(
                    f"The checkpoint {str(path)!r} has no state for {cb.name!r}; it was trained "
                    "without it, so resume with the settings it was started with."
                )
        set_rng_state(s["rng"])

    def save(self, best: bool = False) -> Path:
        """Write a full checkpoint for the current step (atomically); prune old ones.

        Refuses (UserError) to write non-finite parameters or optimizer state; a failed
        write (full disk, read-only directory) leaves the previous checkpoints as they were
        and is reported as one sentence that names the one that survives.
        """
        name = "best" if best else ckpt.checkpoint_name(self.step)
        path = self.ckpt_dir / name
        if not self._state_finite():
            raise UserError(
                f"Not writing checkpoint {name} at step {self.step}: the parameters or optimizer "
                f"state are not finite. {self._last_good()}"
            )
        self._finite_step = self.step
        # rank 0 writes; under FSDP every rank takes part in gathering the full state
        to_save = self.dist.checkpoint_state(self.model, self.optimizer)
        if to_save is not None:
            model_src, optimizer_state = to_save
            try:
                ckpt.save_checkpoint(
                    path,
                    model=model_src,
                    state=self.state(),
                    optimizer_state=optimizer_state,
                    config_text=dump_config(self.cfg),
                    tokenizer=self.tokenizer,
                )
            except OSError as exc:
                latest = ckpt.latest_checkpoint(self.ckpt_dir)
                kept = (
                    f"the previous checkpoint {latest} survives intact"
                    if latest is not None else "no earlier checkpoint exists"
                )
                if best and (path / ckpt.STATE_FILE).is_file():
                    kept += f", and so does the previous {path}"
                raise UserError(
                    f"Could not write checkpoint {path} ({exc.strerror or exc}); {kept}. Free "
                    "disk space or fix the directory's permissions, then resume with train.resume=auto."
                ) from exc
            if not best:
                ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_last)
        if not best:
            self._last_saved_step = self.step
        return path

    # ------------------------------------------------------------------ eval

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    @property
    def val_batches(self):
        """Validation batches of the current curriculum stage (or the only split)."""
        if self.curriculum is not None:
            return self.val_sets[self.curriculum.stage]
        return self.val_sets["val"]

    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats/token), perplexity and bits per byte.

        With a curriculum, every stage is evaluated: ``loss``/``ppl``/``bpb`` are the
        means over stages, ``<stage>/loss`` each stage's, ``stage_loss`` the current one's.
        """
        results = {
            name: lm_metrics(self.forward_model, batches, self.byte_lengths, self.device, self._autocast)
            for name, batches in self.val_sets.items()
        }
        if self.curriculum is None:
            return results["val"]
        out: dict[str, float] = {}
        for key in ("loss", "bpb"):
            out[key] = sum(r[key] for r in results.values()) / len(results)
        out["ppl"] = math.exp(min(out["loss"], 50.0))
        out["tokens"] = sum(r["tokens"] for r in results.values())
        for name, r in results.items():
            out[f"{name}/loss"] = r["loss"]
        out["stage_loss"] = results[self.curriculum.stage]["loss"]
        out["stage"] = self.curriculum.current
        return out

    @torch.no_grad()
    def sample(
        self,
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = 50,
        seed: int | None = None,
    ) -> str:
        """A generation from ``prompt`` that does not disturb the training RNG."""
        prompt = self.cfg.train.sample_prompt if prompt is None else prompt
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]
        ids = ids[-self.cfg.model.block_size :]
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.cfg.train.seed + self.step if seed is None else seed)
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            torch.tensor([ids], device=self.device),
            max_new_tokens or self.cfg.train.sample_tokens,
            temperature=self.cfg.train.sample_temperature if temperature is None else temperature,
            top_k=top_k,
            eos_id=self.tokenizer.eos_id,
            generator=gen,
        )
        self.model.train(was_training)
        return prompt + self.tokenizer.decode(out[0, len(ids) :].tolist())

    # ------------------------------------------------------------------ train

    def train(self, stop_at: int | None = None) -> dict[str, Any]:
        """Run until ``train.max_steps`` (or ``stop_at``, for tests and tools).

        Returns a summary dict. Ctrl-C / SIGTERM finish the current step, save a
        checkpoint and return with ``summary["interrupted"] = True``.
        """
        self.setup()
        self._acquire_lock()  # released when the previous train() returned
        try:
            return self._train(stop_at)
        finally:
            self.close()

    def _train(self, stop_at: int | None) -> dict[str, Any]:
        cfg, tc = self.cfg, self.cfg.train
        end = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
        model = self.model
        model.train()
        for cb in self.callbacks:
            cb.on_train_start(self)
        interrupted = False
        signum = None
        window_tokens, window_start = 0, time.perf_counter()
        start_step = self.step
        start_tokens = self.tokens_seen
        t_start = time.perf_counter()
        bar = None
        if tc.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=end, initial=self.step, desc=cfg.name, unit="step",
                dynamic_ncols=True, file=sys.stderr, leave=True,
                # redraw rarely when stderr is a log file rather than a terminal
                mininterval=0.1 if sys.stderr.isatty() else 15.0,
            )
        try:
            with StopRequest() as stop:
                self._stop = stop
                while self.step < end:
                    record = self._train_step()
                    window_tokens += record["tokens"]
                    if bar is not None:
                        bar.update(1)
                    if self.step % tc.log_interval == 0 or self.step == end:
                        now = time.perf_counter()
                        tps = window_tokens / max(now - window_start, 1e-9)
                        window_tokens, window_start = 0, now
                        record["tokens_per_s"] = tps
                        if self.dist.is_main:
                            record["mfu"] = self._mfu(tps)
                        if self.engine is not None:
                            record.update(self.engine.stats())
                        self.logger.log("train", self.step, **{
                            k: v for k, v in record.items() if k != "tokens"
                        })
                        if bar is not None:
                            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tps:,.0f}",
                                            mfu=f"{record['mfu']:.1%}")
                    if tc.eval_interval and (self.step % tc.eval_interval == 0 or self.step == tc.max_steps):
                        self._eval_and_log()
                    if tc.sample_interval and self.step % tc.sample_interval == 0:
                        self._sample_and_log()
                    if (tc.ckpt_interval and self.step % tc.ckpt_interval == 0) or self.step == tc.max_steps:
                        self.save()
                    # several processes stop together, at the step all of them agreed on
                    if self._stop_agreed if self.dist.enabled else stop.requested:
                        interrupted = True
                        signum = stop.signum
                        if self.dist.enabled:
                            if self._last_saved_step != self.step:
                                self.save()
                        elif not ckpt.list_checkpoints(self.ckpt_dir) or ckpt.latest_checkpoint(
                            self.ckpt_dir
                        ).name != ckpt.checkpoint_name(self.step):
                            self.save()
                        self.echo(f"Stopped at step {self.step}; checkpoint saved. Resume with train.resume=auto.")
                        break
        finally:
            self._stop = None
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - t_start
        run_tps = (self.tokens_seen - start_tokens) / max(elapsed, 1e-9)
        run_mfu = self._mfu(run_tps) if self.dist.is_main and self.step > start_step else None
        if run_mfu is not None:
            self.echo(
                f"throughput: {run_tps:,.0f} tokens/s over {self.dist.world_size} process(es), "
                f"MFU {run_mfu:.1%} (peak: {self._peak.source})"
            )
        if self.step >= tc.max_steps and not interrupted:
            if not tc.sample_interval:
                self._sample_and_log()
            png = None
            if self.dist.is_main:
                png = plot_loss_curve(self.logger.path, self.run_dir / "loss_curve.png", cfg.name)
        else:
            png = None
        self.logger.close()
        return {
            "tokens_per_s": run_tps,
            "mfu": run_mfu,
            "step": self.step,
            "steps_run": self.step - start_step,
            "elapsed_s": elapsed,
            "tokens_seen": self.tokens_seen,
            "interrupted": interrupted,
            "exit_code": StopRequest.exit_code(signum) if interrupted else 0,
            "nonfinite_steps": self.nonfinite_total,
            "last_eval": dict(self.last_eval),
            "best_val": self.best_val,
            "best_step": self.best_step,
            "run_dir": str(self.run_dir),
            "loss_curve": str(png) if png else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
        }

    def _train_step(self) -> dict[str, Any]:
        tc = self.cfg.train
        lr = lr_at(self.step, tc)
        self.reward = None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        penalty_value = 0.0
        tokens = 0
        replay_loss = self._replay_step()
        for micro in range(tc.grad_accum):
            x, y = self.train_data.next_batch()
            if micro == 0 and self.replay is not None:
                # the whole global batch, so that the buffer is the same on every rank
                gx, gy = getattr(self.train_data, "last_global", None) or (x, y)
                self.replay.add((gx.clone(), gy.clone()))
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # DDP all-reduces the gradients in the last micro-batch's backward only
            set_grad_sync(self.forward_model, micro == tc.grad_accum - 1)
            with self._autocast():
                _, loss = self.forward_model(x, y)
            total = loss / tc.grad_accum
            for cb in self.callbacks:
                pen = cb.penalty(self)
                if pen is not None:
                    total = total + pen / tc.grad_accum
                    penalty_value += float(pen.detach()) / tc.grad_accum
            if self.scaler is not None:
                self.scaler.scale(total).backward()
            else:
                total.backward()
            loss_sum += loss.detach().float()
            tokens += x.numel()
        loss_value = float(loss_sum) / tc.grad_accum
        if self.dist.enabled:
            loss_value, penalty_value, replay_loss = self._reduce_step(
                loss_value, penalty_value, replay_loss
            )
            tokens *= self.dist.world_size
        self.tokens_seen += tokens
        record: dict[str, Any] = {"loss": loss_value, "lr": lr, "tokens": tokens}
        if penalty_value:
            record["penalty"] = penalty_value
        if replay_loss is not None:
            record["replay_loss"] = replay_loss
            penalty_value += 0.0 * replay_loss  # a non-finite replay loss skips the step too
        if not (math.isfinite(loss_value) and math.isfinite(penalty_value)):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
            self.step += 1
            record["skipped"] = True
            self.logger.log("nonfinite", self.step, loss=str(loss_value), penalty=str(penalty_value))
            if self.nonfinite_streak >= tc.max_nonfinite:
                raise UserError(
                    f"The loss was not finite for {self.nonfinite_streak} steps in a row "
                    f"(last at step {self.step}); lower train.lr, enable train.grad_clip, or "
                    f"check the data. {self._last_good()}"
                )
            return record
        self.nonfinite_streak = 0
        self.last_loss = loss_value
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if tc.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            record["grad_norm"] = float(grad_norm)
        for cb in self.callbacks:
            cb.after_backward(self)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        for cb in self.callbacks:
            cb.after_step(self, record)
        self.optimizer.zero_grad(set_to_none=True)
        # A finite loss does not mean finite weights (a huge lr overflows the update). One
        # fused check over parameters and optimizer state (checkpoint.state_is_finite) every
        # train.log_interval steps and before every save: per step it would cost ~4% of an
        # H200 step (docs/RELIABILITY.md). The in-memory state cannot be undone; it is never
        # saved, and the run stops at the last good checkpoint on disk.
        done = self.step + 1
        if done % tc.log_interval == 0 or done >= tc.max_steps:
            if not self._state_finite():
                self.logger.log("nonfinite_state", done, loss=loss_value)
                raise UserError(
                    f"The parameters or optimizer state are non-finite after step {done} although "
                    f"the loss was finite ({loss_value:.4g}; last seen finite at step "
                    f"{self._finite_step}); nothing non-finite was saved. {self._last_good()} "
                    "Lower train.lr or set train.grad_clip > 0."
                )
            self._finite_step = done
        self.step += 1
        self.history.append({"step": self.step, "loss": loss_value})
        if self.curriculum is not None and self.curriculum.advance == "steps":
            old = self.curriculum.current
            if self.curriculum.update(self.step):
                self._stage_changed(old)
        return record

    def _reduce_step(
        self, loss: float, penalty: float, replay_loss: float | None
    ) -> tuple[float, float, float | None]:
        """Means across ranks of the step's loss, penalty and replay loss, and whether any
        rank was asked to stop, in one all-reduce: every rank logs, checks finiteness,
        feeds AdaptiveLR and stops on the same values."""
        stop = float(self._stop is not None and self._stop.requested)
        replay = 0.0 if replay_loss is None else replay_loss
        loss, penalty, replay, stop = self.dist.mean([loss, penalty, replay, stop], self.device)
        self._stop_agreed = stop > 0
        return loss, penalty, (None if replay_loss is None else replay)

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation of ``tokens_per_s`` (all processes) on this device type."""
        from neuroplastic.training import mfu

        if self._peak is None:
            self._peak = mfu.device_peak(self.device, self.amp, self.cfg.train.peak_tflops)
            self._flops_per_token = mfu.flops_per_token(self.model, self.block_size)
        return mfu.mfu(self._flops_per_token, tokens_per_s, self._peak, self.dist.world_size)

    @property
    def replay(self):
        """The replay buffer of a rule that keeps one (Consolidation with replay_capacity)."""
        if self.engine is None:
            return None
        return next((r.replay for r in self.engine.rules if getattr(r, "replay", None) is not None), None)

    def _replay_step(self) -> float | None:
        """Every ``plasticity.replay_every`` steps, one past batch as an extra micro-batch."""
        pc = self.cfg.plasticity
        buf = self.replay
        if buf is None or pc.replay_every <= 0 or len(buf) == 0 or (self.step + 1) % pc.replay_every:
            return None
        (rx, ry), = buf.sample(1)
        rx, ry = self.dist.local_rows(rx), self.dist.local_rows(ry)  # this rank's rows
        rx, ry = rx.to(self.device), ry.to(self.device)
        set_grad_sync(self.forward_model, False)  # reduced with the last micro-batch
        with self._autocast():
            _, rloss = self.forward_model(rx, ry)
        scaled = rloss * (pc.replay_weight / self.cfg.train.grad_accum)
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        return float(rloss.detach())

    def _apply_stage_alpha(self) -> None:
        """Set the model's developmental decay scale for the current curriculum stage."""
        alphas = self.cfg.curriculum.alphas
        if self.curriculum is None or not alphas:
            return
        set_alpha = getattr(self.model, "set_alpha", None)
        if set_alpha is None:
            raise UserError(
                f"curriculum.alphas is set but model.arch={self.cfg.model.arch} has no decay to "
                "schedule; use model.arch=hebbian or drop curriculum.alphas."
            )
        set_alpha(float(alphas[self.curriculum.current]))

    def _stage_changed(self, old: int) -> None:
        new = self.curriculum.current
        self._apply_stage_alpha()
        self.logger.log("curriculum", self.step, stage=new, name=self.curriculum.stage)
        self.echo(f"[step {self.step}] curriculum: {self.curriculum.stages[old]} -> {self.curriculum.stage}")
        for cb in self.callbacks:
            cb.on_stage_change(self, old, new)

    def _eval_and_log(self) -> None:
        metrics = self.evaluate()
        self.last_eval = metrics
        if self.curriculum is not None and self.curriculum.advance == "plateau":
            old = self.curriculum.current
            if self.curriculum.update(self.step, metrics["stage_loss"]):
                self._stage_changed(old)
        self.logger.log("eval", self.step, **metrics)
        if metrics["loss"] < self.best_val:
            self.best_val = metrics["loss"]
            self.best_step = self.step
            if self.cfg.train.keep_best:
                self.save(best=True)

    def _sample_and_log(self) -> None:
        if not (self.dist.is_main or self.dist.fsdp):
            return  # under DDP only rank 0 samples (FSDP: generation is a collective)
        text = self.sample()
        self.logger.log("sample", self.step, text=text)
        self.echo(f"[step {self.step}] sample: {text!r}")


def clear_run_dir(run_dir: Path) -> None:
    """Remove a previous run's outputs (used by ``neuroplastic demo`` for its own dir)."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        shutil.rmtree(run_dir)
