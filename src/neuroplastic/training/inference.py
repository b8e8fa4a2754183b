"""Load a trained checkpoint for evaluation or generation."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from neuroplastic.config import RunConfig, config_from_dict
from neuroplastic.errors import UserError
from neuroplastic.training import checkpoint as ckpt


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint directory from a checkpoint dir, a run dir or a checkpoints/ dir.

    For a run directory, ``prefer="best"`` picks ``checkpoints/best`` when present,
    otherwise the latest step checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"Checkpoint {str(p)!r} does not exist.")
    if p.is_dir() and not (p / ckpt.STATE_FILE).exists():
        root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        best = root / "best"
        if prefer == "best" and (best / ckpt.STATE_FILE).exists():
            return best
        latest = ckpt.latest_checkpoint(root)
        if latest is None:
            if (best / ckpt.STATE_FILE).exists():
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
    from neuroplastic.training.loading import load_pretrained, pretrained_dir

    if pretrained_dir(path) is not None:  # a pretrained model (directory or registry name)
        return load_pretrained(path, device=str(device))
    directory = resolve_checkpoint(path, prefer)
    loaded = ckpt.load_checkpoint(directory)
    directory = loaded["path"]
    try:
        cfg: RunConfig = config_from_dict(yaml.safe_load(loaded["config_text"]))
    except yaml.YAMLError as exc:
        raise UserError(f"The config.yaml in {str(directory)!r} is not valid YAML.") from exc
    if not (directory / "tokenizer").is_dir():
        raise UserError(f"Checkpoint {str(directory)!r} has no tokenizer/; it is incomplete.")
    tokenizer = load_tokenizer(directory / "tokenizer")
    if base_model is not None and cfg.model.arch == "hf":
        cfg.model.hf_path = str(base_model)
    model = build_model(cfg.model)
    ckpt.load_model_weights(model, directory / "model.safetensors")
    model.to(device).eval()
    return model, tokenizer, cfg, directory
