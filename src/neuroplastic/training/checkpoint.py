"""Full-state checkpoints: a directory per step, written atomically, loaded without pickle.

Layout of ``<out_dir>/checkpoints/step_0000600/``::

    model.safetensors        weights (tied weights stored once)
    optimizer.safetensors    every tensor of the optimizer state
    state.safetensors        other tensors (torch RNG states, rule buffers, ...)
    state.json               everything else: step, counters, data position, scheduler,
                             python/numpy RNG, optimizer hyper-parameters, rule scalars
    config.yaml              the run's full config
    tokenizer/               the tokenizer, as ``Tokenizer.save`` writes it

A checkpoint is first written into a hidden temporary directory, every file is
fsync'ed, and the directory is renamed into place, so a crash mid-save leaves the
previous checkpoints untouched and no half-written one that looks complete. Replacing an
existing directory (``best``) moves the old one aside first and deletes it only after the
new one is in place; :func:`clean_stale` repairs what a crash in between leaves. One
process writes a run directory at a time (:class:`RunLock`), and the loops refuse to
save parameters or optimizer state that are not finite (:func:`state_is_finite`).
Nothing is ever loaded with pickle: tensors come from safetensors, the rest from JSON.
Reading (layout, loaders, the state codec) is :mod:`neuroplastic.models.checkpoint_io`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from neuroplastic.errors import UserError
from neuroplastic.models.checkpoint_io import (
    LORA_KIND,
    STATE_FILE,
    flatten_state,
    list_checkpoints,
    model_tensors,
)

FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"  # a checkpoint being written
OLD_PREFIX = ".old-"  # a checkpoint moved aside while its replacement is renamed in


# ----------------------------------------------------------------- model weights


def model_file_contents(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What goes into ``model.safetensors``: ``(tensors, metadata)``.

    A model with a recorded pretrained base (``model.base_ref``, set for LoRA runs by
    :meth:`~neuroplastic.models.hf.HFCausalLM.set_base`) stores only its trainable
    tensors (the adapters) plus any frozen base tensor changed in place since loading,
    with the base's name and sha256 in the metadata; every other model stores all its
    weights (:func:`model_tensors`).
    """
    ref = getattr(model, "base_ref", None)
    if not ref:
        return model_tensors(model), {"format": "pt"}
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= set(model.changed_frozen_parameters())
    tensors = {k: v for k, v in model_tensors(model).items() if k in keep}
    meta = {
        "format": "pt",
        "neuroplastic_kind": LORA_KIND,
        "base_model": str(ref["name"]),
        "base_sha256": str(ref["sha256"]),
        "trainable": json.dumps(sorted(n for n, p in model.named_parameters() if p.requires_grad)),
    }
    return tensors, meta


# ----------------------------------------------------------------- files


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    config_text: str = "",
    tokenizer=None,
    before_rename=None,
) -> Path:
    """Write a checkpoint atomically into ``directory`` (which must not exist yet).

    ``state`` may hold tensors anywhere (they go to ``state.safetensors``).
    ``before_rename`` is a test hook called after all files are written.
    """
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{TMP_PREFIX}{directory.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        model_file, model_meta = model_file_contents(model)
        save_file(model_file, str(tmp / "model.safetensors"), metadata=model_meta)
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_skeleton = flatten_state(optimizer_state or {}, opt_tensors, "")
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten_state(state, tensors, "")
        save_file(tensors, str(tmp / "state.safetensors"))
        doc = {"format_version": FORMAT_VERSION, "state": skeleton, "optimizer": opt_skeleton}
        (tmp / STATE_FILE).write_text(json.dumps(doc), encoding="utf-8")
        (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync_file(p)
        _fsync_dir(tmp)
        if before_rename is not None:
            before_rename(tmp)
        # Replacing a directory (``best``) is three renames, never a delete first: the old
        # one is moved aside, the new one renamed in, and only then the old one deleted.
        # A crash in between leaves ``.old-NAME-PID``, which clean_stale() puts back.
        aside = None
        if directory.exists():
            aside = parent / f"{OLD_PREFIX}{directory.name}-{os.getpid()}"
            if aside.exists():
                shutil.rmtree(aside)
            os.rename(directory, aside)
        try:
            os.replace(tmp, directory)
        except BaseException:
            if aside is not None and not directory.exists():
                os.rename(aside, directory)
            raise
        _fsync_dir(parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def clean_stale(ckpt_root: Path) -> list[str]:
    """Tidy up after a crashed save (call it while holding the run's lock, before writing).

    ``.tmp-*`` directories (half-written checkpoints) are deleted; an ``.old-NAME-PID``
    directory (a checkpoint moved aside while ``NAME`` was being replaced) is renamed back
    to ``NAME`` when ``NAME`` is missing or incomplete, and deleted otherwise. Returns what
    was done, one line per directory.
    """
    ckpt_root = Path(ckpt_root)
    done: list[str] = []
    if not ckpt_root.is_dir():
        return done
    for p in sorted(ckpt_root.iterdir()):
        if p.name.startswith(TMP_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed the unfinished save {p.name}")
        elif p.name.startswith(OLD_PREFIX) and p.is_dir():
            name = p.name[len(OLD_PREFIX):].rsplit("-", 1)[0]
            target = ckpt_root / name
            if not (target / STATE_FILE).is_file() and (p / STATE_FILE).is_file():
                if target.exists():
                    shutil.rmtree(target, ignore_errors=True)
                os.rename(p, target)
                done.append(f"restored {name} from an interrupted replacement")
            else:
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p.name}, left by an interrupted replacement")
    return done


def _floating(t: torch.Tensor) -> torch.Tensor | None:
    to_local = getattr(t, "to_local", None)  # an FSDP2 DTensor: this rank's shard
    if to_local is not None:
        t = to_local()
    return t if t.is_floating_point() and t.numel() else None


def _all_finite(groups: list[list[torch.Tensor]], ord: float) -> bool:
    maxima = [torch.stack(torch._foreach_norm(g, ord)).max().float() for g in groups]
    first = maxima[0].device
    return bool(torch.isfinite(torch.stack([m.to(first) for m in maxima]).max()))


@torch.no_grad()
def state_is_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Whether every parameter of ``model`` and every tensor of ``optimizer``'s state is finite.

    Cheap enough for every step: one fused L2 norm per device and dtype
    (``torch._foreach_norm``, one multi-tensor kernel on CUDA) and one host sync. A NaN or
    inf anywhere makes a norm non-finite; a finite tensor can too, when its sum of squares
    overflows (values ~1e19), so a non-finite answer is confirmed exactly with the max-|x|
    norm, which cannot overflow (slower on CPU, so only then). Measured in
    docs/RELIABILITY.md. Under FSDP this sees this rank's shards only.
    """
    tensors = [_floating(p.detach()) for p in model.parameters()]
    if optimizer is not None:
        for st in optimizer.state.values():
            tensors += [_floating(v) for v in st.values() if isinstance(v, torch.Tensor)]
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            by_kind.setdefault((t.device, t.dtype), []).append(t)
    if not by_kind:
        return True
    groups = list(by_kind.values())
    return _all_finite(groups, 2.0) or _all_finite(groups, float("inf"))


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``: one writer per run directory.

    Held until :meth:`release` (or the process ends: the kernel drops it, even on kill -9).
    """

    NAME = ".lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                other = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                other = ""
            os.close(fd)
            who = f" (pid {other})" if other.isdigit() else ""
            raise UserError(
                f"Run directory {str(self.path.parent)!r} is in use by another neuroplastic "
                f"process{who}; wait for it to finish, or pick another train.out_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self, _close=os.close):  # os may be gone at interpreter exit
        if self._fd is not None:
            try:
                _close(self._fd)
            except OSError:
                pass
            self._fd = None


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def prune_checkpoints(ckpt_root: Path, keep_last: int, keep: set[Path] | None = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and those in ``keep``)."""
    keep = {Path(p).resolve() for p in (keep or set())}
    ckpts = list_checkpoints(ckpt_root)
    doomed = ckpts[: max(0, len(ckpts) - max(keep_last, 1))]
    for p in doomed:
        if p.resolve() not in keep:
            shutil.rmtree(p, ignore_errors=True)
    # leftovers of crashed saves
    for p in Path(ckpt_root).glob(".tmp-step_*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(p, ignore_errors=True)
