"""What a gradient run trains and validates on: the tokenizer, the training stream
(packed blocks, or the curriculum's stream) and the validation batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuroplastic.config import RunConfig
from neuroplastic.data.batching import PackedBlocks, sequential_blocks
from neuroplastic.errors import UserError


@dataclass
class Inputs:
    tokenizer: Any
    data: Any  # the prepared corpus (or the curriculum's stages)
    byte_lengths: torch.Tensor  # bytes per token id, for bits per byte
    curriculum: Any  # a Curriculum, or None
    train_data: Any  # next_batch() / state_dict() / load_state_dict()
    val_sets: dict[str, list]


def prepare_inputs(cfg: RunConfig, resume_path: Path | None, world_size: int) -> Inputs:
    """Build the inputs of ``cfg`` (the tokenizer from ``resume_path`` when resuming) and
    fit ``model.vocab_size`` to the tokenizer; the training stream draws the global batch
    of ``world_size`` processes."""
    from neuroplastic.data.pipeline import prepare_data, prepare_stages, token_byte_lengths

    tok_dir = (resume_path / "tokenizer") if resume_path is not None else None
    if tok_dir is not None and not tok_dir.is_dir():
        raise UserError(f"Checkpoint {str(resume_path)!r} has no tokenizer/; it is incomplete.")
    if tok_dir is None and cfg.model.arch == "hf" and cfg.data.tokenizer == cfg.model.hf.path:
        # model=NAME: the model's own tokenizer, from the directory NAME resolves to
        from neuroplastic.models.hf import local_model_dir

        tok_dir = local_model_dir(cfg.model.hf.path, cfg.model.hf.allow_hub)
    curriculum = None
    if cfg.curriculum.stages:
        staged = prepare_stages(cfg.data, cfg.curriculum.stages, tokenizer_dir=tok_dir)
        tokenizer = staged.tokenizer
        data = staged
    else:
        data = prepare_data(cfg.data, tokenizer_dir=tok_dir)
        tokenizer = data.tokenizer
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer))

    if cfg.model.arch == "hf":
        pass  # the pretrained model brings its own vocabulary
    elif cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise UserError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size}); set model.vocab_size=0 to match it."
        )
    block_size, tc = cfg.block_size, cfg.train
    if cfg.curriculum.stages:
        from neuroplastic.curriculum import Curriculum, CurriculumStream

        cc = cfg.curriculum
        curriculum = Curriculum(
            cc.stages, tc.max_steps, cc.advance, cc.boundaries, cc.patience, cc.min_delta
        )
        train_data = CurriculumStream(
            data.train, curriculum, block_size,
            tc.batch_size * world_size, seed=tc.seed, cumulative=cc.cumulative,
        )
        val_sets = {
            name: sequential_blocks(v, block_size, tc.batch_size, tc.eval_batches)
            for name, v in data.val.items()
        }
    else:
        train_data = PackedBlocks(
            data.train_tokens, block_size, tc.batch_size * world_size,
            seed=tc.seed,
        )
        val_sets = {
            "val": sequential_blocks(
                data.val_tokens, block_size, tc.batch_size, tc.eval_batches
            )
        }
    return Inputs(tokenizer, data, byte_lengths, curriculum, train_data, val_sets)


def stage_means(results: dict[str, dict[str, float]], curriculum) -> dict[str, float]:
    """Per-stage validation metrics -> ``loss``/``ppl``/``bpb`` (means over stages),
    ``<stage>/loss`` each stage's, ``stage_loss`` the current stage's and ``stage``."""
    out: dict[str, float] = {}
    for key in ("loss", "bpb"):
        out[key] = sum(r[key] for r in results.values()) / len(results)
    out["ppl"] = math.exp(min(out["loss"], 50.0))
    out["tokens"] = sum(r["tokens"] for r in results.values())
    for name, r in results.items():
        out[f"{name}/loss"] = r["loss"]
    out["stage_loss"] = results[curriculum.stage]["loss"]
    out["stage"] = curriculum.current
    return out
