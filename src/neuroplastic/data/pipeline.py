"""From a :class:`~neuroplastic.config.DataConfig` to a tokenizer and token streams."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neuroplastic.config import DataConfig
from neuroplastic.data.batching import join_documents
from neuroplastic.errors import UserError


@dataclass
class PreparedData:
    tokenizer: object
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    description: str
    train_documents: int
    val_documents: int


def _synthetic_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    from neuroplastic.data.synthetic import STAGES, SyntheticCurriculum

    stages = cfg.stages or list(STAGES)
    for s in stages:
        if s not in STAGES:
            raise UserError(f"Unknown synthetic stage {s!r} in data.stages; valid: {', '.join(STAGES)}.")
    cur = SyntheticCurriculum(seed=cfg.synthetic_seed)
    train, val = [], []
    for s in stages:
        train.extend(cur.documents(s))
        val.extend(cur.validation_documents(s))
    return train, val


RECALL_SOURCES = ("needle", "mqar")


def _recall_documents(name: str, seed: int, max_bytes: int = 2048) -> tuple[list[str], list[str]]:
    """Training and validation documents of a synthetic recall task (different seeds)."""
    from neuroplastic.data import recall_tasks

    if name == "needle":
        lo = min(256, max_bytes)
        return (recall_tasks.needle_documents(min_bytes=lo, max_bytes=max_bytes, seed=seed),
                recall_tasks.needle_documents(count=100, min_bytes=lo, max_bytes=max_bytes,
                                              seed=seed + 1_000_003))
    return (recall_tasks.mqar_documents(seed=seed),
            recall_tasks.mqar_documents(count=100, seed=seed + 1_000_003))


def _split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the tail of the corpus (by characters) for validation."""
    if len(docs) == 1 or len(docs) < 20:
        text = "\n\n".join(docs)
        cut = int(len(text) * (1 - val_fraction))
        return [text[:cut]], [text[cut:]]
    total = sum(len(d) for d in docs)
    target = total * (1 - val_fraction)
    acc = 0
    for i, d in enumerate(docs):
        acc += len(d)
        if acc >= target:
            cut = max(1, min(i + 1, len(docs) - 1))
            return docs[:cut], docs[cut:]
    return docs[:-1], docs[-1:]


def _truncate(docs: list[str], max_chars: int) -> list[str]:
    if max_chars <= 0:
        return docs
    out, n = [], 0
    for d in docs:
        if n >= max_chars:
            break
        out.append(d[: max_chars - n])
        n += len(out[-1])
    return out


def prepare_data(cfg: DataConfig, tokenizer_dir: Path | None = None) -> PreparedData:
    """Load documents, build (or reload) the tokenizer and tokenize train/val streams.

    ``tokenizer_dir``: a saved tokenizer to use instead of building one (resume).
    """
    from neuroplastic.data.sources import load_documents
    from neuroplastic.data.tokenizers import build_tokenizer, load_tokenizer

    if cfg.source == "synthetic":
        train_docs, val_docs = _synthetic_documents(cfg)
        desc = "embedded synthetic curriculum"
    elif cfg.source in RECALL_SOURCES:
        train_docs, val_docs = _recall_documents(cfg.source, cfg.synthetic_seed, cfg.recall_max_bytes)
        desc = f"synthetic {cfg.source} recall task"
    else:
        docs = load_documents(cfg.source, field=cfg.field, data_dir=cfg.data_dir or None)
        docs = [d for d in docs if d]
        if not docs:
            raise UserError(f"Data source {cfg.source!r} contains no text.")
        train_docs, val_docs = _split_documents(docs, cfg.val_fraction)
        desc = cfg.source
    train_docs = _truncate(train_docs, cfg.max_chars)
    if cfg.max_chars > 0:
        val_docs = _truncate(val_docs, max(1, int(cfg.max_chars * cfg.val_fraction)))

    if tokenizer_dir is not None:
        tok = load_tokenizer(tokenizer_dir)
    else:
        tok = build_tokenizer(cfg.tokenizer, lambda: iter(train_docs), cfg.bpe_vocab_size)

    def encode_all(docs: list[str]) -> np.ndarray:
        return join_documents([tok.encode(d) for d in docs], tok.eos_id)

    train = encode_all(train_docs)
    val = encode_all(val_docs)
    if len(val) < 2:
        raise UserError("The validation split is empty; raise data.val_fraction or use more data.")
    return PreparedData(tok, train, val, desc, len(train_docs), len(val_docs))


def token_byte_lengths(tokenizer) -> np.ndarray:
    """Bytes of text each token id stands for (0 for special tokens), for bits per byte."""
    n = tokenizer.vocab_size
    out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        try:
            out[i] = len(tokenizer.decode_bytes([i]))
        except Exception:  # ids a tokenizer cannot decode alone (specials) count as 0 bytes
            out[i] = 0
    return out


@dataclass
class PreparedStages:
    tokenizer: object
    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    description: str


def _synthetic_stage(cfg: DataConfig, name: str, cache: dict) -> tuple[list[str], list[str]]:
    from neuroplastic.data.synthetic import STAGES, SyntheticCurriculum

    if name not in STAGES:
        raise UserError(
            f"Unknown synthetic stage {name!r} in curriculum.stages; valid: {', '.join(STAGES)}."
        )
    if "cur" not in cache:
        cache["cur"] = SyntheticCurriculum(seed=cfg.synthetic_seed)
    cur = cache["cur"]
    return cur.documents(name), cur.validation_documents(name)


def _stage_available(spec: str, cfg: DataConfig) -> bool:
    from neuroplastic.data.registry import REGISTRY, find_local

    if spec.startswith("synthetic:") or spec in RECALL_SOURCES:
        return True
    if spec in REGISTRY:
        return find_local(spec, cfg.data_dir or None) is not None
    return Path(spec).exists()


def stage_documents(cfg: DataConfig, stages: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    """Train/val documents per curriculum stage.

    A stage is a synthetic stage name (with ``data.source=synthetic``), ``synthetic:NAME``,
    or any data source spec. ``a|b|c`` lists alternatives: the first one available
    locally is used (e.g. ``wordnet|synthetic:definitions`` falls back to the embedded
    definitions when WordNet is not on this machine).
    """
    from neuroplastic.data.sources import load_documents

    out: dict[str, tuple[list[str], list[str]]] = {}
    cache: dict = {}
    for stage in stages:
        options = [o.strip() for o in stage.split("|") if o.strip()]
        chosen = next((o for o in options if _stage_available(o, cfg)), options[-1])
        if cfg.source == "synthetic" and "|" not in stage and ":" not in chosen:
            out[stage] = _synthetic_stage(cfg, chosen, cache)
            continue
        if chosen in RECALL_SOURCES:
            out[stage] = _recall_documents(chosen, cfg.synthetic_seed, cfg.recall_max_bytes)
            continue
        if chosen.startswith("synthetic:"):
            out[stage] = _synthetic_stage(cfg, chosen.split(":", 1)[1], cache)
            continue
        docs = [d for d in load_documents(chosen, field=cfg.field, data_dir=cfg.data_dir or None) if d]
        if not docs:
            raise UserError(f"Curriculum stage {chosen!r} contains no text.")
        out[stage] = _split_documents(docs, cfg.val_fraction)
    if cfg.max_chars > 0:
        per = max(1, cfg.max_chars // len(stages))
        out = {
            s: (_truncate(tr, per), _truncate(va, max(1, int(per * cfg.val_fraction))))
            for s, (tr, va) in out.items()
        }
    return out


def prepare_stages(cfg: DataConfig, stages: list[str], tokenizer_dir: Path | None = None) -> PreparedStages:
    from neuroplastic.data.tokenizers import build_tokenizer, load_tokenizer

    docs = stage_documents(cfg, stages)
    if tokenizer_dir is not None:
        tok = load_tokenizer(tokenizer_dir)
    else:
        tok = build_tokenizer(
            cfg.tokenizer, lambda: (d for tr, _ in docs.values() for d in tr), cfg.bpe_vocab_size
        )
    train, val = {}, {}
    for s, (tr, va) in docs.items():
        train[s] = join_documents([tok.encode(d) for d in tr], tok.eos_id)
        val[s] = join_documents([tok.encode(d) for d in va], tok.eos_id)
        if len(val[s]) < 2:
            raise UserError(f"The validation split of curriculum stage {s!r} is empty.")
    desc = ("synthetic curriculum " if cfg.source == "synthetic" else "curriculum ") + " -> ".join(stages)
    return PreparedStages(tok, train, val, desc)
