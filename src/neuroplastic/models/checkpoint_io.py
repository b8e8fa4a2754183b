"""Reading checkpoints: the on-disk layout (``step_NNNNNNN/`` with ``state.json``), the
tensor/JSON codec of nested state, and loaders that never unpickle.

The writer (atomic save, pruning, the run lock) is the training layer's checkpoint module;
this module is below it so that evaluation and model loading can read checkpoints without
importing training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from neuroplastic.errors import UserError

CKPT_RE = re.compile(r"^step_(\d{7,})$")
STATE_FILE = "state.json"


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


#: ``model.safetensors`` metadata of a checkpoint that holds LoRA adapters only.
LORA_KIND = "lora-adapter"


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
