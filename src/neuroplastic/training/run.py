"""The one run shell: everything a training run does around its steps.

:class:`Run` owns the run directory and its lock, the resume policy
(``train.resume``: ``auto`` / ``none`` / a checkpoint path, and the compatibility check
of a checkpoint's config), checkpoint naming, pruning and the ``best`` copy, the guard
that never saves non-finite state, the logger (JSONL + TensorBoard + progress bar), the
stop signal (:class:`StopRequest`) and the loop itself. What one step does is a *step
strategy* (the gradient :class:`~neuroplastic.training.trainer.Trainer`, the
needle-recall step) with these members:

* ``step`` (optimizer steps done), ``tokenizer`` (saved with every checkpoint);
* ``train_step() -> record``: one step; advances ``step``; the record holds ``loss``
  and ``tokens`` (the tokens it consumed);
* ``state() -> dict``: what ``state.json`` stores (tensors allowed), ``state_finite()``,
  ``checkpoint_payload() -> (model, optimizer_state) | None`` (None on ranks that do
  not write);
* ``log_extras(tokens_per_s) -> dict`` and ``postfix(record) -> dict``: extra keys for
  the ``train`` log line and the progress bar;
* ``after_step()``: evaluation and samples at their intervals;
* ``progress_desc``: the progress bar's label;
* optionally ``finished``: True once a streaming strategy's data has ended before ``end``
  (the loop then logs, saves and stops as it does at ``train.max_steps``).

A run whose config is not a :class:`~neuroplastic.config.RunConfig` (``neuroplastic
neurogen train``) gives :class:`Run` a :class:`RunSettings`, the text of its
``config.yaml`` and its own compatibility check instead.

``neuroplastic train`` drives a strategy through ``setup()`` (which resumes it when asked),
``describe()``, ``resumed_from``, ``train() -> summary`` (with ``run_dir``, ``last_eval``
and ``exit_code``), and ``logger``/``close()`` when there is nothing to train.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroplastic.config import RunConfig, config_from_saved, dump_config
from neuroplastic.errors import UserError
from neuroplastic.models import checkpoint_io
from neuroplastic.training import checkpoint as ckpt
from neuroplastic.training.distributed import Distributed, NullLogger, env_rank
from neuroplastic.training.metrics import MetricsLogger


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
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


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


def clear_run_dir(run_dir: Path) -> None:
    """Remove a previous run's outputs (``neuroplastic demo``, ``cot demo`` for their own
    dirs). Refused (one sentence) while another process holds the directory's lock; the
    lock file itself is kept, so a process that takes it later locks the same file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    lock = ckpt.RunLock(run_dir).acquire()
    try:
        for entry in run_dir.iterdir():
            if entry.name == ckpt.RunLock.NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    finally:
        lock.release()


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


@dataclass
class RunSettings:
    """What the shell reads of a run's settings, for a run configured otherwise than by a
    :class:`~neuroplastic.config.RunConfig` (whose ``train`` section has the same fields).
    ``max_steps`` may be ``math.inf`` (until the strategy's data ends)."""

    out_dir: str
    max_steps: int | float
    resume: str = "none"  # none | auto | a checkpoint path
    ckpt_interval: int = 0
    keep_last: int = 2
    log_interval: int = 10
    progress: bool = True
    tensorboard: bool = True


def data_ended(strategy) -> bool:
    """Whether a streaming strategy's data has ended (its optional ``finished``)."""
    return bool(getattr(strategy, "finished", False))


#: What a run's messages name, as ``neuroplastic train`` spells it; another kind of run
#: passes its own spelling (``Run(names=...)``).
OPTION_NAMES = {
    "resume": "train.resume=auto",
    "resume_path": "train.resume=PATH",
    "max_steps": "train.max_steps",
    "stabilise": "Lower train.lr or set train.grad_clip > 0.",
}


class Run:
    """The shell of one training run (module docstring); ``dist`` is the process group
    the strategy set up (one process by default).

    ``cfg`` is a ``neuroplastic train`` config (its ``train`` section holds the settings).
    Another kind of run passes ``cfg=None`` with ``settings``, ``config_text`` (returns the
    text of ``config.yaml``), ``check`` (``check(loaded, path)`` raises UserError for a
    checkpoint it cannot resume) and ``names``: how its user spells what the messages name
    (keys of :data:`OPTION_NAMES`).
    """

    def __init__(self, cfg: RunConfig | None, echo: Callable[[str], None], *,
                 settings: RunSettings | None = None, config_text: Callable[[], str] | None = None,
                 check: Callable[[dict[str, Any], Path], None] | None = None,
                 names: dict[str, str] | None = None):
        if cfg is None and (settings is None or config_text is None or check is None):
            raise TypeError("Run(cfg=None) needs settings, config_text and check")
        self.cfg = cfg
        self.echo = echo
        self._settings = settings
        self._config_text = config_text
        self._check = check
        self.names = {**OPTION_NAMES, **(names or {})}
        self.resume_hint = self.names["resume"]
        self.dist = Distributed()
        self.logger: MetricsLogger | NullLogger | None = None
        self.stop: StopRequest | None = None
        self.stop_agreed = False  # set by a data-parallel strategy: every rank agreed to stop
        self.finite_step = 0  # the last step after which the state was checked finite
        self.last_saved_step = -1
        self._lock: ckpt.RunLock | None = None

    # ------------------------------------------------------------------ directory

    @property
    def settings(self):
        """``cfg.train`` (a TrainConfig), or the :class:`RunSettings` given."""
        return self.cfg.train if self.cfg is not None else self._settings

    def config_text(self) -> str:
        """What ``config.yaml`` holds (in the run directory and in every checkpoint)."""
        return dump_config(self.cfg) if self.cfg is not None else self._config_text()

    @property
    def run_dir(self) -> Path:
        if self.cfg is None:
            return Path(self._settings.out_dir)
        return Path(self.cfg.train.out_dir.format(name=self.cfg.name))

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def open(self) -> None:
        """Check the run directory is writable, lock it, and repair an interrupted save."""
        check_writable(self.run_dir)
        self.acquire_lock()
        try:
            check_writable(self.ckpt_dir)
            if env_rank() == 0:
                for line in ckpt.clean_stale(self.ckpt_dir):
                    self.echo(f"checkpoints: {line}")
        except BaseException:
            self.close()
            raise

    def setup(self, build: Callable[[], Any]) -> None:
        """:meth:`open`, then ``build()`` (the strategy's setup); a failure releases the lock."""
        self.open()
        try:
            build()
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Hold the run directory's lock for one ``train()`` call."""
        self.acquire_lock()  # released when the previous train() returned
        try:
            yield
        finally:
            self.close()

    def acquire_lock(self) -> None:
        """One writer per run directory (rank 0 writes; the other ranks of a group do not lock)."""
        if env_rank() != 0:
            return
        if self._lock is None:
            self._lock = ckpt.RunLock(self.run_dir)
        self._lock.acquire()

    def close(self) -> None:
        """Release the run directory's lock."""
        if self._lock is not None:
            self._lock.release()

    # ------------------------------------------------------------------ resume

    def resume_path(self) -> Path | None:
        """The checkpoint ``train.resume`` names (None: start fresh)."""
        spec = self.settings.resume
        if spec in ("", "none"):
            existing = checkpoint_io.list_checkpoints(self.ckpt_dir)
            if existing:
                raise UserError(
                    f"Run directory {str(self.run_dir)!r} already holds checkpoints; continue it "
                    "with train.resume=auto (or --resume), or pick another train.out_dir."
                )
            return None
        if spec == "auto":
            return checkpoint_io.latest_checkpoint(self.ckpt_dir)
        path = Path(spec)
        if not path.exists():
            raise UserError(f"Checkpoint {spec!r} given in train.resume does not exist.")
        return path

    def resume(self) -> tuple[Path | None, dict[str, Any] | None]:
        """``(path, loaded checkpoint)`` of :meth:`resume_path`, checked compatible
        (``(None, None)``: start fresh)."""
        path = self.resume_path()
        if path is None:
            return None, None
        loaded = checkpoint_io.load_checkpoint(path)
        self.check_compatible(loaded, path)
        return path, loaded

    def check_compatible(self, loaded: dict[str, Any], resume_path: Path) -> None:
        """Refuse a checkpoint whose model, data or curriculum settings differ from now."""
        import yaml

        if self.cfg is None:
            self._check(loaded, resume_path)
            return
        cfg = self.cfg
        saved_cfg = config_from_saved(yaml.safe_load(loaded["config_text"]))
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

    def check_resumed(self, strategy, resume_path: Path) -> None:
        """After restoring: the state is finite and not past ``train.max_steps``."""
        self.finite_step = strategy.step
        if not strategy.state_finite():
            raise UserError(
                f"Checkpoint {str(resume_path)!r} holds non-finite parameters or optimizer "
                f"state; resume from an earlier checkpoint with {self.names['resume_path']}."
            )
        max_steps = self.settings.max_steps
        if strategy.step > max_steps:
            raise UserError(
                f"Checkpoint {str(resume_path)!r} is at step {strategy.step}, past "
                f"{self.names['max_steps']}={max_steps}; raise {self.names['max_steps']} above {strategy.step} "
                "to train further (or evaluate the checkpoint as it is)."
            )

    def open_logger(self, resume_step: int | None) -> MetricsLogger | NullLogger:
        """The metrics logger (rank 0; the others get a NullLogger) and ``config.yaml``."""
        if self.dist.is_main:
            self.logger = MetricsLogger(
                self.run_dir, tensorboard=self.settings.tensorboard, resume_step=resume_step,
                resume_hint=self.resume_hint,
            )
            (self.run_dir / "config.yaml").write_text(self.config_text(), encoding="utf-8")
        else:
            self.logger = NullLogger(self.run_dir)
        return self.logger

    # ------------------------------------------------------------------ checkpoints

    def last_good(self) -> str:
        """A sentence naming the last checkpoint on disk (every one we write is finite)."""
        latest = checkpoint_io.latest_checkpoint(self.ckpt_dir)
        if latest is None:
            return "No checkpoint had been written yet, so there is none to resume from."
        return (
            f"The last good checkpoint is untouched: {latest} (step {int(latest.name[5:])}); "
            f"resume from it with {self.resume_hint}."
        )

    def guard_finite(self, done: int, loss: float, finite: bool) -> None:
        """After step ``done``: stop (UserError) if the state went non-finite."""
        if not finite:
            self.logger.log("nonfinite_state", done, loss=loss)
            raise UserError(
                f"The parameters or optimizer state are non-finite after step {done} although "
                f"the loss was finite ({loss:.4g}; last seen finite at step "
                f"{self.finite_step}); nothing non-finite was saved. {self.last_good()} "
                f"{self.names['stabilise']}"
            )
        self.finite_step = done

    def save(self, strategy, best: bool = False) -> Path:
        """Write a full checkpoint of ``strategy`` at its step (atomically); prune old ones.

        Refuses (UserError) to write non-finite parameters or optimizer state; a failed
        write (full disk, read-only directory) leaves the previous checkpoints as they were
        and is reported as one sentence that names the one that survives.
        """
        step = strategy.step
        name = "best" if best else ckpt.checkpoint_name(step)
        path = self.ckpt_dir / name
        if not strategy.state_finite():
            raise UserError(
                f"Not writing checkpoint {name} at step {step}: the parameters or optimizer "
                f"state are not finite. {self.last_good()}"
            )
        self.finite_step = step
        # rank 0 writes; under FSDP every rank takes part in gathering the full state
        to_save = strategy.checkpoint_payload()
        if to_save is not None:
            model_src, optimizer_state = to_save
            try:
                ckpt.save_checkpoint(
                    path,
                    model=model_src,
                    state=strategy.state(),
                    optimizer_state=optimizer_state,
                    config_text=self.config_text(),
                    tokenizer=strategy.tokenizer,
                )
            except OSError as exc:
                latest = checkpoint_io.latest_checkpoint(self.ckpt_dir)
                kept = (
                    f"the previous checkpoint {latest} survives intact"
                    if latest is not None else "no earlier checkpoint exists"
                )
                if best and (path / checkpoint_io.STATE_FILE).is_file():
                    kept += f", and so does the previous {path}"
                raise UserError(
                    f"Could not write checkpoint {path} ({exc.strerror or exc}); {kept}. Free "
                    f"disk space or fix the directory's permissions, then resume with {self.resume_hint}."
                ) from exc
            if not best:
                ckpt.prune_checkpoints(self.ckpt_dir, self.settings.keep_last)
        if not best:
            self.last_saved_step = step
        return path

    # ------------------------------------------------------------------ loop

    def loop(self, strategy, end: int, progress: bool | None = None) -> dict[str, Any]:
        """Step ``strategy`` until step ``end``: log, evaluate, checkpoint, stop on a signal.

        Returns ``steps_run``, ``elapsed_s``, ``interrupted`` and ``exit_code``.
        """
        tc = self.settings
        interrupted = False
        signum = None
        window_tokens, window_start = 0, time.perf_counter()
        start_step = strategy.step
        t_start = time.perf_counter()
        bar = None
        if (tc.progress if progress is None else progress) and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=end, initial=strategy.step, desc=strategy.progress_desc, unit="step",
                dynamic_ncols=True, file=sys.stderr, leave=True,
                # redraw rarely when stderr is a log file rather than a terminal
                mininterval=0.1 if sys.stderr.isatty() else 15.0,
            )
        try:
            with StopRequest() as stop:
                self.stop = stop
                while strategy.step < end and not data_ended(strategy):
                    record = strategy.train_step()
                    step = strategy.step
                    ended = data_ended(strategy)
                    window_tokens += record["tokens"]
                    if bar is not None:
                        bar.update(1)
                    if step % tc.log_interval == 0 or step == end or ended:
                        now = time.perf_counter()
                        tps = window_tokens / max(now - window_start, 1e-9)
                        window_tokens, window_start = 0, now
                        record["tokens_per_s"] = tps
                        record.update(strategy.log_extras(tps))
                        self.logger.log("train", step, **{
                            k: v for k, v in record.items() if k != "tokens"
                        })
                        if bar is not None:
                            bar.set_postfix(**strategy.postfix(record))
                    strategy.after_step()
                    if (tc.ckpt_interval and step % tc.ckpt_interval == 0) or step == tc.max_steps or ended:
                        self.save(strategy)
                    # several processes stop together, at the step all of them agreed on
                    if self.stop_agreed if self.dist.enabled else stop.requested:
                        interrupted = True
                        signum = stop.signum
                        if self.dist.enabled:
                            if self.last_saved_step != step:
                                self.save(strategy)
                        elif not checkpoint_io.list_checkpoints(self.ckpt_dir) or checkpoint_io.latest_checkpoint(
                            self.ckpt_dir
                        ).name != ckpt.checkpoint_name(step):
                            self.save(strategy)
                        self.echo(f"Stopped at step {step}; checkpoint saved. Resume with {self.resume_hint}.")
                        break
        finally:
            self.stop = None
            if bar is not None:
                bar.close()
        return {
            "steps_run": strategy.step - start_step,
            "elapsed_s": time.perf_counter() - t_start,
            "interrupted": interrupted,
            "exit_code": StopRequest.exit_code(signum) if interrupted else 0,
        }
