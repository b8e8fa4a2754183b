"""Process-level runtime: seeding, RNG state, the device resolver and mixed precision.

One device resolver for the whole package (training, evaluation, generation, the
benchmarks): :func:`resolve_device` turns ``auto`` / ``cpu`` / ``cuda[:N]`` / ``mps`` into a
``torch.device`` or raises a :class:`UserError` that names the option the user set.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from neuroplastic.errors import UserError

__all__ = ["amp_dtype", "model_device", "resolve_device", "rng_state", "seed_everything", "set_rng_state"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


def resolve_device(spec: str | torch.device, option: str = "--device") -> torch.device:
    """``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda[:N]`` or ``mps``;
    UserError naming ``option`` (``--device``, ``train.device``) when the device does not
    exist on this machine."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"{option} {spec!r} is not a device; use auto, cpu, cuda or cuda:N.") from exc
    sep = "=" if "." in option else " "
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{option} is {spec!r} but CUDA is not available on this machine; use {option}{sep}cpu (or auto).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{option} is {spec!r} but this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}.")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{option} is {spec!r} but MPS is not available on this machine; use {option}{sep}cpu (or auto).")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{option} {spec!r} is not supported; use auto, cpu, cuda or cuda:N.")
    return dev


def model_device(model: torch.nn.Module, device: str | torch.device | None = None) -> torch.device:
    """``device`` when given, else the device of the model's first parameter (CPU for none)."""
    if device is not None:
        return torch.device(device)
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def amp_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` = auto | bf16 | fp16 | none on ``device``."""
    if spec == "none":
        return None
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if spec == "fp16" and device.type != "cuda":
        raise UserError("train.amp=fp16 needs a CUDA device; use train.amp=bf16 or none on CPU.")
    return torch.bfloat16 if spec == "bf16" else torch.float16
