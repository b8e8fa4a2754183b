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
    from neuroplastic.data.registry import find_local, parse_spec

    if spec.startswith("synthetic:") or spec in RECALL_SOURCES:
        return True
    parsed = parse_spec(spec)
    if parsed is not None:
        entry, split = parsed
        return find_local(entry.name, cfg.data_dir or None, split) is not None  # stream-only: never local
    return Path(spec).exists()


def choose_stage_source(stage: str, cfg: DataConfig) -> str:
    """The source a curriculum stage reads: the first of its ``a|b|c`` alternatives available
    locally. Passing over an alternative is a :class:`~neuroplastic.data.sources.DataWarning`
    naming what was skipped, where it was looked for and what is used instead."""
    from neuroplastic.data.registry import data_dirs
    from neuroplastic.data.sources import warn_data

    options = [o.strip() for o in stage.split("|") if o.strip()]
    if not options:
        raise UserError(f"Curriculum stage {stage!r} names no data source; give a source or a synthetic stage.")
    chosen = next((o for o in options if _stage_available(o, cfg)), options[-1])
    skipped = options[: options.index(chosen)]
    if skipped:
        looked = ", ".join(str(d) for d in data_dirs(cfg.data_dir or None))
        others = [o for spec in skipped for o in _other_splits(spec, cfg)]
        also = f"; present instead: {', '.join(others)}" if others else ""
        warn_data(
            f"curriculum stage {stage!r}: {', '.join(skipped)} {'is' if len(skipped) == 1 else 'are'} not on this "
            f"machine (looked in {looked}{also}), so this stage trains on {chosen} instead; put the corpus in a "
            "data dir (see `neuroplastic data`) to train on it"
        )
    return chosen


def _other_splits(spec: str, cfg: DataConfig) -> list[str]:
    """``NAME@SPLIT`` specs of the splits of a registry corpus that are here when ``spec`` is not."""
    from neuroplastic.data.registry import local_files, parse_spec

    parsed = parse_spec(spec)
    if parsed is None:
        return []
    entry, split = parsed
    return [f"{entry.name}@{s}" for s, _ in local_files(entry.name, cfg.data_dir or None) if s and s != split]


def stage_documents(
    cfg: DataConfig, stages: list[str], chosen: dict[str, str] | None = None
) -> dict[str, tuple[list[str], list[str]]]:
    """Train/val documents per curriculum stage.

    A stage is a synthetic stage name (with ``data.source=synthetic``), ``synthetic:NAME``,
    or any data source spec. ``a|b|c`` lists alternatives: the first one available
    locally is used (e.g. ``wordnet|synthetic:definitions`` falls back to the embedded
    definitions when WordNet is not on this machine), with a warning (:func:`choose_stage_source`).
    ``chosen``, when given, receives the source each stage reads.
    """
    from neuroplastic.data.sources import load_documents

    out: dict[str, tuple[list[str], list[str]]] = {}
    cache: dict = {}
    for stage in stages:
        chosen_source = choose_stage_source(stage, cfg)
        if chosen is not None:
            chosen[stage] = chosen_source
        if cfg.source == "synthetic" and "|" not in stage and ":" not in chosen_source:
            out[stage] = _synthetic_stage(cfg, chosen_source, cache)
            continue
        if chosen_source in RECALL_SOURCES:
            out[stage] = _recall_documents(chosen_source, cfg.synthetic_seed, cfg.recall_max_bytes)
            continue
        if chosen_source.startswith("synthetic:"):
            out[stage] = _synthetic_stage(cfg, chosen_source.split(":", 1)[1], cache)
            continue
        docs = [d for d in load_documents(chosen_source, field=cfg.field, data_dir=cfg.data_dir or None) if d]
        if not docs:
            raise UserError(f"Curriculum stage {chosen_source!r} contains no text.")
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

    chosen: dict[str, str] = {}
    docs = stage_documents(cfg, stages, chosen)
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
    # name what each stage reads, not the alternatives it was given ("a|b" -> "b (a not found)")
    names = []
    for s in stages:
        options = [o.strip() for o in s.split("|") if o.strip()]
        skipped = options[: options.index(chosen[s])] if chosen[s] in options else []
        names.append(chosen[s] + (f" ({', '.join(skipped)} not found)" if skipped else ""))
    desc = ("synthetic curriculum " if cfg.source == "synthetic" else "curriculum ") + " -> ".join(names)
    return PreparedStages(tok, train, val, desc)
