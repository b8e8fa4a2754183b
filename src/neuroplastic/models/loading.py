"""Load any model neuroplastic can evaluate, from whatever directory it was saved in.

:func:`load_trained` loads one of our checkpoint / run directories (or a pretrained
Hugging Face directory / registry name); :func:`load_any_model` accepts, checked in this order: a ``neuroplastic cot train``
output directory (its ``adapter/`` or ``model/``), a LoRA adapter directory (written by
:func:`~neuroplastic.models.hf.save_adapter`; the base model from ``base_model``, the
run's config or the adapter's ``base_model_name_or_path``), a Hugging Face model
directory (``config.json`` + weights), or one of our checkpoint / run directories
(:func:`load_trained`). Used by ``neuroplastic evaluate``, ``generate``, ``cot
evaluate`` and the lm-eval adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from neuroplastic.config import RunConfig, config_from_saved
from neuroplastic.errors import UserError
from neuroplastic.models import checkpoint_io

__all__ = [
    "load_any_model",
    "load_pretrained",
    "load_trained",
    "pretrained_dir",
    "read_base_ref",
    "read_run_config",
    "resolve_checkpoint",
]


def _hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def read_run_config(run_dir: Path) -> RunConfig | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        return config_from_saved(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, UserError):
        return None


def pretrained_dir(path: str | Path) -> Path | None:
    """The Hugging Face model directory ``path`` names -- a registry name (made on first use)
    or a directory with ``config.json`` that is not one of our runs or checkpoints -- else
    ``None``."""
    from neuroplastic.models.registry import is_registry_name, resolve_model

    p = Path(path).expanduser()
    if not p.exists():
        return Path(resolve_model(str(path))) if is_registry_name(str(path)) else None
    if not p.is_dir() or not _hf_dir(p):
        return None
    if (p / checkpoint_io.STATE_FILE).exists() or (p / "checkpoints").is_dir():
        return None
    return p


def load_pretrained(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Any, RunConfig, Path]:
    """``(model, tokenizer, cfg, directory)`` as :func:`load_trained`
    returns them, for a plain Hugging Face directory or registry name (see :func:`pretrained_dir`):
    the model behind our API, our tokenizer of its files, and a config that names it
    (``model=DIR``, block size = the model's context)."""
    from neuroplastic.data.tokenizers import load_tokenizer
    from neuroplastic.models.hf import HFCausalLM

    directory = pretrained_dir(path)
    if directory is None:
        raise UserError(f"{str(path)!r} is neither a Hugging Face model directory nor a registry name.")
    model = HFCausalLM.from_pretrained(directory, device=device)
    cfg = RunConfig()
    cfg.name = directory.name
    cfg.model.arch = "hf"
    cfg.model.hf.path = str(path)
    cfg.model.block_size = model.config.block_size
    cfg.data.tokenizer = str(directory)
    return model.eval(), load_tokenizer(directory), cfg, directory



def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint directory from a checkpoint dir, a run dir or a checkpoints/ dir.

    For a run directory, ``prefer="best"`` picks ``checkpoints/best`` when present,
    otherwise the latest step checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"Checkpoint {str(p)!r} does not exist.")
    if p.is_dir() and not (p / checkpoint_io.STATE_FILE).exists():
        root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        best = root / "best"
        if prefer == "best" and (best / checkpoint_io.STATE_FILE).exists():
            return best
        latest = checkpoint_io.latest_checkpoint(root)
        if latest is None:
            if (best / checkpoint_io.STATE_FILE).exists():
                return best
            raise UserError(f"No complete checkpoint found in {str(p)!r}.")
        return latest
    return p


def load_trained(
    path: str | Path, device: str | torch.device = "cpu", prefer: str = "best",
    base_model: str | None = None,
):
    """``(model, tokenizer, cfg, checkpoint_dir)`` from a checkpoint or run directory, or
    from a pretrained Hugging Face directory or registry name (``smollm2-135m-instruct``).

    ``base_model``: for a LoRA run, the pretrained base to put the adapters on instead of
    the run's ``model.hf_path`` (a directory or registry name; its weights must be the
    ones the adapters were trained on, checked by sha256)."""
    from neuroplastic.data.tokenizers import load_tokenizer
    from neuroplastic.models import build_model

    if pretrained_dir(path) is not None:  # a pretrained model (directory or registry name)
        return load_pretrained(path, device=str(device))
    directory = resolve_checkpoint(path, prefer)
    loaded = checkpoint_io.load_checkpoint(directory)
    directory = loaded["path"]
    try:
        cfg: RunConfig = config_from_saved(yaml.safe_load(loaded["config_text"]))
    except yaml.YAMLError as exc:
        raise UserError(f"The config.yaml in {str(directory)!r} is not valid YAML.") from exc
    if not (directory / "tokenizer").is_dir():
        raise UserError(f"Checkpoint {str(directory)!r} has no tokenizer/; it is incomplete.")
    tokenizer = load_tokenizer(directory / "tokenizer")
    if base_model is not None and cfg.model.arch == "hf":
        cfg.model.hf.path = str(base_model)
    model = build_model(cfg.model)
    checkpoint_io.load_model_weights(model, directory / "model.safetensors")
    model.to(device).eval()
    return model, tokenizer, cfg, directory


def read_base_ref(adapter_dir: Path) -> dict[str, Any]:
    """The base an adapter directory records (``neuroplastic_base.json``), or ``{}``."""
    from neuroplastic.models.hf import BASE_REF_FILE

    try:
        doc = json.loads((Path(adapter_dir) / BASE_REF_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def load_any_model(
    model_path: str | Path, base_model: str | None = None, device: str = "cpu", dtype: Any = None
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """``(model, tokenizer, info)`` in eval mode (see the module docs); ``dtype`` applies
    to Hugging Face models (``float32`` by default)."""
    from neuroplastic.models.hf import HFCausalLM, check_adapter_base, load_adapter, load_causal_lm
    from neuroplastic.models.registry import is_registry_name, resolve_model

    path = Path(model_path).expanduser()
    if not path.exists() and is_registry_name(str(model_path)):
        path = Path(resolve_model(str(model_path)))  # a registry name: its cached directory
    if base_model is not None and not Path(base_model).expanduser().exists() and is_registry_name(base_model):
        base_model = resolve_model(base_model)
    if not path.exists():
        raise UserError(f"Model path {str(path)!r} does not exist.")
    run_cfg = read_run_config(path)
    adapter = next((p for p in (path / "adapter", path) if (p / "adapter_config.json").is_file()), None)
    info: dict[str, Any] = {"model_path": str(path)}
    if adapter is not None:
        base = base_model
        if base is None:
            try:
                cfg_json = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UserError(f"{str(adapter / 'adapter_config.json')!r} is not valid JSON.") from exc
            base = cfg_json.get("base_model_name_or_path") if isinstance(cfg_json, dict) else None
            ref = read_base_ref(adapter)
            if ref.get("name") and (is_registry_name(ref["name"]) or Path(ref["name"]).is_dir()):
                base = ref["name"]
            if run_cfg is not None and run_cfg.model.hf.path:
                base = run_cfg.model.hf.path
        if base and is_registry_name(str(base)) and not Path(base).expanduser().exists():
            base = resolve_model(str(base))
        if not base or not Path(base).expanduser().is_dir():
            raise UserError(
                f"The adapter in {str(adapter)!r} needs its base model; pass --base_model DIR "
                "(the local model it was trained on)."
            )
        check_adapter_base(adapter, base)
        model, tokenizer = load_causal_lm(base, device=device, dtype=dtype)
        model = load_adapter(model, adapter)
        info.update(kind="lora adapter", adapter=str(adapter), base_model=str(base))
        return HFCausalLM(model, tokenizer).eval(), tokenizer, info
    for d in (path / "model", path):
        if _hf_dir(d):
            model, tokenizer = load_causal_lm(d, device=device, dtype=dtype)
            info.update(kind="hugging face model", hf_dir=str(d))
            return HFCausalLM(model, tokenizer).eval(), tokenizer, info
    model, tokenizer, cfg, directory = load_trained(path, device=device, base_model=base_model)
    info.update(kind="neuroplastic checkpoint", checkpoint=str(directory))
    if getattr(model, "tokenizer", None) is not None:
        tokenizer = model.tokenizer
    return model, tokenizer, info
