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
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from neuroplastic.errors import UserError

CKPT_RE = re.compile(r"^step_(\d{7,})$")
STATE_FILE = "state.json"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"  # a checkpoint being written
OLD_PREFIX = ".old-"  # a checkpoint moved aside while its replacement is renamed in


# ----------------------------------------------------------------- nested state <-> flat


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Replace every tensor in a nested dict/list by a ``{"__tensor__": key}`` reference.

    Tensors go into ``tensors`` (to be saved with safetensors); the returned skeleton
    is JSON-serialisable.
    """
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(f"state key {k!r} is not a str or int")
            out[str(k) if isinstance(k, str) else f"__int__{k}"] = flatten_state(
                v, tensors, f"{prefix}.{k}" if prefix else str(k)
            )
        return out
    if isinstance(obj, list | tuple):
        items = [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if obj is None or isinstance(obj, bool | int | float | str):
        if isinstance(obj, float) and obj != obj:  # NaN survives JSON as a marker
            return {"__float__": "nan"}
        if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
            return {"__float__": "inf" if obj > 0 else "-inf"}
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {
            (int(k[7:]) if k.startswith("__int__") else k): unflatten_state(v, tensors)
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


# ----------------------------------------------------------------- model weights


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with shared (tied) tensors kept once, under the first name."""
    seen: dict[tuple, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.storage_offset()) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.detach().cpu().contiguous()
    return out


# ----------------------------------------------------------------- LoRA: adapters, not the base

#: ``model.safetensors`` metadata of a checkpoint that holds LoRA adapters only.
LORA_KIND = "lora-adapter"


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


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return {}


def _load_lora_weights(
    model: torch.nn.Module, path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]
) -> None:
    """Put a LoRA checkpoint's adapters (and changed base tensors) onto ``model``, whose
    base must be the one the checkpoint names (same sha256)."""
    ref = getattr(model, "base_ref", None)
    want_name, want_sha = meta.get("base_model", "?"), meta.get("base_sha256", "")
    if not ref:
        raise UserError(
            f"Checkpoint {str(path)!r} holds only LoRA adapters for base model {want_name!r}, "
            "but the model it is loaded into has no LoRA base; build it with model.lora set and "
            f"model={want_name}."
        )
    if want_sha and ref.get("sha256") != want_sha:
        raise UserError(
            f"Checkpoint {str(path)!r} holds LoRA adapters trained on base model {want_name!r} "
            f"(weights sha256 {want_sha[:12]}), but the base loaded now ({ref.get('name')!r}) "
            f"has sha256 {str(ref.get('sha256'))[:12]}; load it onto the base it was trained on."
        )
    expected = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(tensors))
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing or unexpected:
        what = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
        raise UserError(
            f"The LoRA adapters in {str(path)!r} do not fit this model ({what}); load them with "
            "the model.lora settings they were trained with."
        )
    _check_shapes(path, tensors, expected, "the model.lora settings")
    model.load_state_dict(tensors, strict=False)


def _check_shapes(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  settings: str) -> None:
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise UserError(
                f"Checkpoint {str(path)!r} has {k} of shape {tuple(t.shape)} but the model "
                f"expects {tuple(expected[k].shape)}; load it with {settings} it was trained with."
            )


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Load ``model.safetensors`` into ``model``; shape or key mismatches -> UserError."""
    tensors = load_safetensors(path)
    meta = _safetensors_metadata(path)
    if meta.get("neuroplastic_kind") == LORA_KIND:
        _load_lora_weights(model, Path(path), tensors, meta)
        return
    expected = model.state_dict()
    wanted = model_tensors(model)
    missing = [k for k in wanted if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(
            f"Checkpoint {str(path)!r} does not fit this model ({what}); "
            "it was saved from a different architecture."
        )
    _check_shapes(path, tensors, expected, "the model config")
    model.load_state_dict(tensors, strict=False)


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


_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint file {str(path)!r} is missing; the checkpoint is incomplete.")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_PICKLE_MAGIC):
        raise UserError(
            f"{str(path)!r} is a pickle/zip file, which neuroplastic refuses to load because "
            "unpickling can run arbitrary code; convert it to safetensors."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(
            f"{str(path)!r} is not a valid safetensors file (truncated or foreign: "
            f"{str(exc).splitlines()[0][:80]})."
        ) from exc


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"Checkpoint file {str(path)!r} is missing; the checkpoint is incomplete.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{str(path)!r} is not valid JSON (truncated or foreign file).") from exc


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


def load_checkpoint(directory: Path) -> dict[str, Any]:
    """Read a checkpoint directory: ``{"state", "optimizer", "config_text", "path"}``.

    Model weights are loaded separately with :func:`load_model_weights` once the model
    is built from ``config_text``.
    """
    directory = Path(directory)
    if directory.is_file():
        # A user may point at model.safetensors (or a stray .pt file) directly.
        if directory.name == "model.safetensors":
            directory = directory.parent
        else:
            load_safetensors(directory)  # refuses pickles with a clear message
            raise UserError(
                f"{str(directory)!r} is a file; point at a checkpoint directory "
                "(e.g. runs/NAME/checkpoints/step_0000600)."
            )
    if not directory.is_dir():
        raise UserError(f"Checkpoint {str(directory)!r} does not exist.")
    doc = read_json(directory / STATE_FILE)
    if not isinstance(doc, dict) or "state" not in doc:
        raise UserError(f"{str(directory / STATE_FILE)!r} is not a neuroplastic checkpoint state.")
    tensors = load_safetensors(directory / "state.safetensors")
    opt_tensors = load_safetensors(directory / "optimizer.safetensors")
    # Model weights are validated now so that a truncated file is reported up front.
    _check_safetensors_header(directory / "model.safetensors")
    config_path = directory / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"Checkpoint {str(directory)!r} has no config.yaml; it is incomplete.")
    try:
        return {
            "state": unflatten_state(doc["state"], tensors),
            "optimizer": unflatten_state(doc.get("optimizer", {}), opt_tensors),
            "config_text": config_path.read_text(encoding="utf-8"),
            "path": directory,
        }
    except KeyError as exc:
        raise UserError(
            f"Checkpoint {str(directory)!r} is inconsistent (tensor {exc} is missing)."
        ) from exc


def _check_safetensors_header(path: Path) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"Checkpoint file {str(path)!r} is missing; the checkpoint is incomplete.")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_PICKLE_MAGIC):
        load_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            size = path.stat().st_size
            for k in keys[-1:]:
                f.get_slice(k)
        if size < 8:
            raise ValueError("file too small")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(
            f"{str(path)!r} is not a valid safetensors file (truncated or foreign)."
        ) from exc


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories under ``ckpt_root``, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


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
